"""Planning the real shared datasets with the real memory model.

``plans/hippocampus.json`` is the plan medseg produces for ``../shared/data/hippocampus`` at the defaults;
re-planning must reproduce its key fields. Regenerate it (after an intended change) from the repository root with::

    PYTHONPATH=tests/unit/planning python -c "import test_real_datasets as t; t.write_hippocampus_plan()"
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest

from medseg.fingerprint import Fingerprint, extract_fingerprint
from medseg.io.dataset import DatasetInfo, load_dataset
from medseg.planning.plan import Plan
from medseg.planning.planner import PlannerOptions, plan_dataset

REPO = Path(__file__).resolve().parents[3]
SHARED_DATA = REPO.parent / "shared" / "data"
HIPPOCAMPUS_PLAN = REPO / "plans" / "hippocampus.json"


@cache
def _dataset(name: str) -> tuple[DatasetInfo, Fingerprint]:
    root = SHARED_DATA / name
    assert root.is_dir(), f"real data folder {root} is missing (expected ../shared/data beside the checkout)"
    ds = load_dataset(root)
    return ds, extract_fingerprint(ds, num_workers=2, progress=False)


def write_hippocampus_plan() -> None:
    ds, fp = _dataset("hippocampus")
    plan_dataset(ds, fp, PlannerOptions()).save(HIPPOCAMPUS_PLAN)


def _key_fields(plan: Plan) -> dict:
    out = {"label_ids": list(plan.label_ids), "default": plan.default_configuration}
    for name, cfg in plan.configurations.items():
        out[name] = {
            "spacing": [round(s, 6) for s in cfg.spacing],
            "median_shape": list(cfg.median_shape),
            "normalization": [(n.scheme, n.use_nonzero_mask) for n in cfg.normalization],
            "data_identifier": cfg.data_identifier,
            "mirror_axes": cfg.mirror_axes,
            "networks": {
                arch: (
                    list(n.patch_size),
                    n.batch_size,
                    [list(k) for k in n.spec.kernel_sizes],
                    [list(s) for s in n.spec.strides],
                )
                for arch, n in cfg.networks.items()
            },
        }
    return out


@pytest.mark.slow
def test_hippocampus_plan_matches_the_reference_file():
    ds, fp = _dataset("hippocampus")
    plan = plan_dataset(ds, fp, PlannerOptions())
    ref = Plan.load(HIPPOCAMPUS_PLAN)
    assert _key_fields(plan) == _key_fields(ref)
    full = plan.configuration("3d_fullres")
    assert full.spacing == (1.0, 1.0, 1.0)
    assert full.patch_size == (40, 56, 40)
    assert full.network().spec.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))  # three poolings per axis
    assert set(plan.configurations) == {"2d", "3d_fullres"}
    assert plan.configuration("2d").data_identifier == full.data_identifier
    # the anterior hippocampus lies before the posterior one along Z and after it along Y in every case:
    # only X (left-right) is mirrored, in 3D patches and in 2D (Y, X) slices
    assert full.mirror_axes == (2,)
    assert plan.configuration("2d").mirror_axes == (1,)
    assert full_notes_order(plan) == {"0": "Anterior before Posterior", "1": "Posterior before Anterior"}


def full_notes_order(plan: Plan) -> dict[str, str]:
    notes = plan.notes["configurations"]["3d_fullres"]["mirroring"]["not_mirrored"]
    return {axis: n["order"] for axis, n in notes.items()}


def test_hippocampus_memory_budgets():
    ds, fp = _dataset("hippocampus")
    plans = {gb: plan_dataset(ds, fp, PlannerOptions(gpu_memory_gb=gb)) for gb in (2.0, 8.0, 80.0)}
    for gb, plan in plans.items():
        for cfg in plan.configurations.values():
            net = cfg.network()
            assert net.batch_size >= 2
            assert net.estimated_memory_gb is not None and net.estimated_memory_gb <= gb
    full = {gb: p.configuration("3d_fullres") for gb, p in plans.items()}
    # the images are small: 80 GB stops at the (rounded-up) image size and the 5% cap sets the batch
    assert full[80.0].patch_size == (40, 56, 40)
    total = sum(np.prod(np.round(c.shape_after_crop)) for c in fp.cases)
    assert full[80.0].batch_size == int(0.05 * total / np.prod(full[80.0].patch_size))
    assert "5% dataset cap" in plans[80.0].notes["configurations"]["3d_fullres"]["unet"]["batch_rule"]
    assert np.prod(full[2.0].patch_size) * full[2.0].batch_size <= np.prod(full[8.0].patch_size) * full[8.0].batch_size


@pytest.mark.slow
def test_totalseg_ct_normalisation_and_gapped_label_ids():
    ds, fp = _dataset("totalseg_ct")
    plan = plan_dataset(ds, fp, PlannerOptions())
    assert plan.label_ids == tuple(ds.label_ids)
    assert plan.label_ids[0] == 0 and max(plan.label_ids) == 117
    st = fp.intensity[0]
    for cfg in plan.configurations.values():
        (n,) = cfg.normalization
        assert n.scheme == "ct"
        assert (n.clip_low, n.clip_high, n.mean, n.std) == (st.percentile_00_5, st.percentile_99_5, st.mean, st.std)
        assert -1100 < n.clip_low < n.clip_high < 3500
    assert plan.configuration("3d_fullres").spacing == (3.0, 3.0, 3.0)
    small = plan_dataset(ds, fp, PlannerOptions(gpu_memory_gb=2.0)).configuration("3d_fullres")
    big = plan.configuration("3d_fullres")
    assert np.prod(small.patch_size) <= np.prod(big.patch_size) and small.batch_size >= 2
    assert Plan.from_json(plan.to_json()) == plan


def test_totalseg_fingerprint_counts_classes_with_original_ids():
    ds, fp = _dataset("totalseg_ct")
    counts = fp.cases[0].class_voxel_counts
    assert counts and all(k in ds.label_ids and k > 0 for k in counts)
    assert all(sum(fp.cases[0].class_component_sizes[k]) == v for k, v in counts.items())


@pytest.mark.parametrize("name", ["hippocampus"])
def test_fingerprint_of_real_data(name):
    ds, fp = _dataset(name)
    assert fp.num_cases == len(ds.cases) == 200
    assert fp.median_spacing() == (1.0, 1.0, 1.0)
    assert fp.intensity[0].num_samples > 100_000


def test_roundtrip_dice_admits_coarser_abdominal_mri_but_not_hippocampus():
    """The resolution lever's bound on the real labels: CHAOS T2 organs keep >= 0.97 at 2x in-plane, the
    hippocampus loses > 0.05 already at 1.5x (so the lever could never coarsen it)."""
    from medseg.planning.resolution import MIN_ROUNDTRIP_DICE, coarser_spacings
    from medseg.preprocessing.resolution import dataset_roundtrip_dice

    chaos, _ = _dataset("chaos_t2")
    at = dataset_roundtrip_dice(chaos, coarser_spacings((7.7, 1.25, 1.25)), max_cases=8)
    assert set(at[0]) == {"liver", "right_kidney", "left_kidney", "spleen"}
    assert all(min(d.values()) >= MIN_ROUNDTRIP_DICE for d in at)
    assert all(at[1][k] < at[0][k] < 1.0 for k in at[0])  # coarser loses more
    hippo, _ = _dataset("hippocampus")
    (h,) = dataset_roundtrip_dice(hippo, coarser_spacings((1.0, 1.0, 1.0))[:1], max_cases=8)
    assert max(h.values()) < 0.95
