"""plan_dataset: configurations (pinned to nnU-Net v2's choices), 3d_lowres, architectures, 2D datasets,
JSON and options. The fingerprints are planned with the reference memory model of ``conftest.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import PlanError
from medseg.planning.plan import Plan
from medseg.planning.planner import PlannerOptions, plan_dataset

from .conftest import ANISO5, BRATS, HIPPO_LIKE, LIVERLIKE, PROSTATE, make_ds, make_fp, plan, reference_estimator


def topo(cfg) -> tuple:
    net = cfg.network()
    return [list(x) for x in net.spec.strides], [list(x) for x in net.spec.kernel_sizes]


# ----------------------------------------------------------------------------------------------- pinned to nnU-Net
def test_hippocampus_like_plan():
    p = plan(*HIPPO_LIKE)
    full = p.configuration("3d_fullres")
    assert full.spacing == (1.0, 1.0, 1.0)
    assert full.patch_size == (40, 56, 40)
    assert full.network().spec.num_stages == 4
    assert set(p.configurations) == {"3d_fullres", "2d"}
    assert p.configuration("2d").patch_size == (56, 40)
    assert p.default_configuration == "3d_fullres"


def test_anisotropic_prostate_like_plan_matches_nnunet():
    p = plan(*PROSTATE)
    full = p.configuration("3d_fullres")
    assert full.spacing == (3.0, 0.625, 0.625)
    assert full.patch_size == (20, 320, 256)
    strides, kernels = topo(full)
    assert strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert kernels == [[1, 3, 3], [1, 3, 3]] + [[3, 3, 3]] * 5
    assert full.batch_size == 2
    two = p.configuration("2d")
    assert two.patch_size == (320, 320) and two.network().spec.num_stages == 7
    assert two.spacing == full.spacing
    assert "3d_lowres" not in p.configurations


def test_five_mm_slices_plan_matches_nnunet():
    p = plan(*ANISO5)
    full = p.configuration("3d_fullres")
    assert full.spacing == (5.0, 0.8, 0.8)
    assert full.patch_size == (24, 256, 256)
    strides, kernels = topo(full)
    assert strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert kernels == [[1, 3, 3], [1, 3, 3]] + [[3, 3, 3]] * 5
    assert p.configuration("2d").patch_size == (512, 512)


def test_coarse_x_axis_is_planned_like_nnunet_after_its_transpose():
    p = plan([(0.8, 0.8, 5.0)] * 10, [(512, 512, 40)] * 10)
    full = p.configuration("3d_fullres")
    assert full.patch_size == (256, 256, 24)
    assert [list(s) for s in full.network().spec.strides][1] == [2, 2, 1]


def test_lowres_is_planned_for_large_images_and_matches_nnunet():
    p = plan(*LIVERLIKE)
    full, low = p.configuration("3d_fullres"), p.configuration("3d_lowres")
    assert full.patch_size == (112, 160, 128)
    assert np.allclose(low.spacing, (2.2879276757, 1.7617043103, 1.7617043103), rtol=1e-6)
    assert low.patch_size == (112, 160, 128)
    assert low.data_identifier != full.data_identifier
    assert np.prod(low.patch_size) / np.prod(low.median_shape) >= 0.25
    assert "planned" in p.notes["3d_lowres"]["decision"]


def test_lowres_not_created_when_the_patch_covers_the_image():
    p = plan(*BRATS)
    assert "3d_lowres" not in p.configurations
    assert "not needed" in p.notes["3d_lowres"]["decision"]


# ----------------------------------------------------------------------------------------------- architectures
def test_every_arch_gets_its_own_network_plan():
    ds = make_ds()
    fp = make_fp(*HIPPO_LIKE)
    opts = PlannerOptions(archs=("unet", "deeplab", "psp", "fcn"))
    p = plan_dataset(ds, fp, opts, memory_estimator=reference_estimator)
    for cfg in p.configurations.values():
        assert set(cfg.networks) == {"unet", "deeplab", "psp", "fcn"}
        assert cfg.default_arch == "unet"
        for arch, net in cfg.networks.items():
            assert net.arch == arch and net.batch_size >= 2 and net.estimated_memory_gb is not None


# ----------------------------------------------------------------------------------------------- 2D datasets
def test_2d_dataset_gets_only_a_2d_configuration():
    p = plan([(0.5, 0.5)] * 10, [(300, 400)] * 10)
    assert set(p.configurations) == {"2d"}
    assert p.default_configuration == "2d"
    cfg = p.configuration()
    assert cfg.dims == 2 and len(cfg.spacing) == 3 and cfg.patch_size == (320, 448)


# ----------------------------------------------------------------------------------------------- JSON, options
def test_plan_round_trips_through_json(tmp_path):
    p = plan(*LIVERLIKE)
    p.save(tmp_path / "plans.json")
    back = Plan.load(tmp_path / "plans.json")
    assert back == p
    d = json.loads((tmp_path / "plans.json").read_text())
    assert d["configurations"]["3d_fullres"]["networks"]["unet"]["patch_size"] == [112, 160, 128]
    assert "median_spacing" in d["notes"]["spacing"]


def test_edited_inconsistent_plan_is_refused(tmp_path):
    p = plan(*HIPPO_LIKE)
    d = p.to_dict()
    d["configurations"]["3d_fullres"]["networks"]["unet"]["patch_size"] = [36, 56, 40]
    (tmp_path / "plans.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="not divisible"):
        Plan.load(tmp_path / "plans.json")


def test_bad_options_and_mismatched_fingerprint_are_refused():
    with pytest.raises(PlanError, match="gpu_memory_gb"):
        plan_dataset(
            make_ds(), make_fp(*HIPPO_LIKE), PlannerOptions(gpu_memory_gb=-1), memory_estimator=reference_estimator
        )
    with pytest.raises(PlanError, match="channels"):
        plan_dataset(make_ds(("MRI", "T2")), make_fp(*HIPPO_LIKE), memory_estimator=reference_estimator)


def test_options_are_recorded():
    ds, fp = make_ds(), make_fp(*HIPPO_LIKE)
    opts = PlannerOptions(gpu_memory_gb=4.0, device="cpu", time_budget_minutes=30.0, precision="bf16", base_features=16)
    p = plan_dataset(ds, fp, opts, memory_estimator=reference_estimator)
    assert (p.device, p.gpu_memory_gb, p.time_budget_minutes) == ("cpu", 4.0, 30.0)
    net = p.configuration().network()
    assert net.precision == "bf16" and net.spec.base_features == 16 and net.spec.features_per_stage()[0] == 16
