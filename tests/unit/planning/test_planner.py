"""plan_dataset: spacing rule, normalisation, configurations, memory fitting, JSON.

Most tests plan hand-built fingerprints (no files) with ``reference_estimator``: a memory model that counts
the feature-map values of a plain UNet and maps them to GB with nnU-Net v2's published reference (a 3D
network producing 560M values at batch 2 = 8 GB; a 2D one producing 85M values at batch 12 = 8 GB). With
it the planner's choices can be pinned to the values nnU-Net v2 (2.8.1) itself picks for the same
fingerprints; those expectations were produced by running nnU-Net's planner on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import PlanError
from medseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from medseg.io.dataset import DatasetInfo
from medseg.planning.plan import NetworkPlan, Plan
from medseg.planning.planner import PlannerOptions, determine_target_spacing, plan_dataset


# ----------------------------------------------------------------------------------------------- helpers
def feature_map_values(net: NetworkPlan, num_classes: int) -> int:
    """Values a plain UNet (2 convs per stage, transposed-conv decoder) produces for one sample."""
    sizes, cur = [], list(net.patch_size)
    for s in net.strides:
        cur = [c // st for c, st in zip(cur, s)]
        sizes.append(list(cur))
    feats = net.features_per_stage()
    total = sum(net.n_conv_per_stage * f * int(np.prod(sz)) for f, sz in zip(feats, sizes))
    total += sum((net.n_conv_per_stage + 1) * feats[s] * int(np.prod(sizes[s])) for s in range(len(sizes) - 1))
    return total + num_classes * int(np.prod(sizes[0]))


CALLS: list[NetworkPlan] = []


def reference_estimator(net: NetworkPlan, in_channels: int, num_classes: int) -> float:
    CALLS.append(net)
    ref, ref_bs = (560e6, 2) if net.dims == 3 else (85e6, 12)
    return net.batch_size * feature_map_values(net, num_classes) * 8.0 / (ref_bs * ref)


def make_ds(channel_names=("MRI",), label_ids=(0, 1, 2)) -> DatasetInfo:
    return DatasetInfo(
        root=Path("/nonexistent"),
        name="test",
        channel_names=tuple(channel_names),
        label_ids=tuple(label_ids),
        label_names=tuple(f"label{i}" for i in label_ids),
        cases=(),
        file_ending=".nii.gz",
    )


def make_fp(spacings, shapes, channel_names=("MRI",), label_ids=(0, 1, 2), relative=1.0, intensity=None) -> Fingerprint:
    cases = tuple(
        CaseFingerprint(
            case_id=f"case_{i:03d}",
            spacing=tuple(float(s) for s in sp),
            shape=tuple(int(s) for s in sh),
            shape_after_crop=tuple(int(s) for s in sh),
            relative_size_after_crop=relative,
        )
        for i, (sp, sh) in enumerate(zip(spacings, shapes))
    )
    st = intensity or IntensityStats(100.0, 50.0, 90.0, -1000.0, 2000.0, -900.0, 1500.0, 1000)
    return Fingerprint("test", tuple(channel_names), tuple(label_ids), cases, (st,) * len(channel_names))


def plan(spacings, shapes, gpu=8.0, channel_names=("MRI",), **fp_kw) -> Plan:
    ds = make_ds(channel_names)
    fp = make_fp(spacings, shapes, channel_names=channel_names, **fp_kw)
    return plan_dataset(ds, fp, PlannerOptions(gpu_memory_gb=gpu), memory_estimator=reference_estimator)


PROSTATE = (
    [(z, 0.625, 0.625) for z in (3.0, 3.6, 3.6, 4.0, 3.0, 3.6, 4.0, 3.6)],
    [(z, 320, 320) for z in (15, 20, 24, 18, 20, 22, 16, 19)],
)
BRATS = ([(1.0, 1.0, 1.0)] * 10, [(138, 169, 138)] * 10)
LIVERLIKE = ([(1.0, 0.77, 0.77)] * 10, [(400, 512, 512)] * 10)
ANISO5 = ([(5.0, 0.8, 0.8)] * 10, [(40, 512, 512)] * 10)
HIPPO_LIKE = ([(1.0, 1.0, 1.0)] * 20, [(36, 50, 35)] * 20)


def topo(cfg) -> tuple:
    net = cfg.network()
    return [list(x) for x in net.strides], [list(x) for x in net.kernel_sizes]


# ----------------------------------------------------------------------------------------------- spacing rule
def test_target_spacing_is_the_median_for_isotropic_data():
    sp = np.array([(1.0, 1.0, 1.0), (1.2, 0.9, 0.9), (0.8, 1.1, 1.1)])
    target, notes = determine_target_spacing(sp, np.full((3, 3), 100.0))
    assert target == (1.0, 1.0, 1.0)
    assert notes["anisotropic_spacing"] is False


def test_anisotropic_short_axis_uses_its_10th_percentile():
    z = np.array([3.0, 3.6, 3.6, 4.0, 3.0, 3.6, 4.0, 3.6, 5.0, 2.5])
    sp = np.stack([z, np.full(10, 0.7), np.full(10, 0.7)], 1)
    shapes = np.tile([20.0, 320.0, 320.0], (10, 1))
    target, notes = determine_target_spacing(sp, shapes)
    assert target[0] == pytest.approx(np.percentile(z, 10)) == pytest.approx(2.95)
    assert target[1:] == (0.7, 0.7)
    assert "10th percentile" in notes["anisotropy_rule"]


def test_anisotropic_but_long_axis_keeps_the_median():
    z = np.array([3.0, 3.6, 4.0, 5.0])
    sp = np.stack([z, np.full(4, 0.7), np.full(4, 0.7)], 1)
    shapes = np.tile([200.0, 320.0, 320.0], (4, 1))  # 200 * 3 >= 320: not short
    target, _ = determine_target_spacing(sp, shapes)
    assert target[0] == pytest.approx(3.8)


def test_anisotropic_percentile_never_goes_below_the_other_axes():
    z = np.array([0.5, 0.5] + [5.0] * 8)  # 10th percentile 0.5 mm, finer than the 0.8 mm in plane
    sp = np.stack([z, np.full(10, 0.8), np.full(10, 0.8)], 1)
    target, _ = determine_target_spacing(sp, np.tile([20.0, 512.0, 512.0], (10, 1)))
    assert target[0] == pytest.approx(0.8 + 1e-5)


# ----------------------------------------------------------------------------------------------- pinned to nnU-Net
def test_hippocampus_like_plan():
    p = plan(*HIPPO_LIKE)
    full = p.configuration("3d_fullres")
    assert full.spacing == (1.0, 1.0, 1.0)
    assert full.patch_size == (40, 56, 40)
    assert full.network().num_stages == 4
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
    assert two.patch_size == (320, 320) and two.network().num_stages == 7
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
    assert [list(s) for s in full.network().strides][1] == [2, 2, 1]


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


# ----------------------------------------------------------------------------------------------- memory budget
def test_memory_budget_2_8_80_gb():
    small, mid, big = (plan(*BRATS, gpu=g).configuration("3d_fullres") for g in (2.0, 8.0, 80.0))
    assert small.patch_size == (80, 96, 80) and small.network().num_stages == 5
    assert mid.patch_size == (128, 128, 128) and mid.network().num_stages == 6
    # 80 GB: the patch stops at the (rounded-up) image size, the 5% cap limits the batch
    assert big.patch_size == (160, 192, 160)
    for cfg, gpu in ((small, 2.0), (mid, 8.0), (big, 80.0)):
        net = cfg.network()
        assert net.batch_size >= 2
        assert 0 < net.estimated_memory_gb <= gpu
        assert net.estimated_memory_gb == pytest.approx(reference_estimator(net, 1, 3), abs=1e-4)
    total = 10 * 138 * 169 * 138
    assert big.batch_size == max(2, int(0.05 * total / np.prod(big.patch_size)))
    big_plan = plan(*BRATS, gpu=80.0)
    assert "5% dataset cap" in big_plan.notes["configurations"]["3d_fullres"]["unet"]["batch_rule"]


def test_batch_is_the_largest_that_fits_when_memory_limits_it():
    many = ([(1.0, 1.0, 1.0)] * 400, [(138, 169, 138)] * 400)  # large dataset: the 5% cap is far away
    p = plan(*many, gpu=24.0)
    net = p.configuration("3d_fullres").network()
    assert net.batch_size > 2
    assert reference_estimator(net, 1, 3) <= 24.0
    from dataclasses import replace

    assert reference_estimator(replace(net, batch_size=net.batch_size + 1), 1, 3) > 24.0


def test_estimates_are_memoised():
    CALLS.clear()
    plan(*LIVERLIKE)
    keys = [(n.arch, n.patch_size, n.batch_size, n.strides, n.dims) for n in CALLS]
    assert len(keys) == len(set(keys))


def test_batch_never_below_two_even_when_nothing_fits():
    def overhead_estimator(net, c, k):  # 1 GB fixed: nothing fits 0.5 GB
        return 1.0 + reference_estimator(net, c, k)

    p = plan_dataset(make_ds(), make_fp(*BRATS), PlannerOptions(gpu_memory_gb=0.5), memory_estimator=overhead_estimator)
    for cfg in p.configurations.values():
        assert cfg.batch_size == 2
        assert cfg.patch_size == (8,) * cfg.dims  # shrunk as far as it goes
    assert p.notes["configurations"]["3d_fullres"]["unet"]["fits_budget"] is False


def test_tiny_images_that_cannot_shrink_still_get_a_plan():
    p = plan([(1.0, 1.0, 1.0)] * 4, [(6, 7, 8)] * 4, gpu=1e-9)
    assert p.configuration("3d_fullres").patch_size == (6, 7, 8)
    assert p.configuration("3d_fullres").batch_size == 2


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


# ----------------------------------------------------------------------------------------------- normalisation
def test_ct_normalisation_uses_foreground_statistics():
    st = IntensityStats(40.0, 120.0, 35.0, -1024.0, 3000.0, -950.0, 1400.0, 5000)
    p = plan(*HIPPO_LIKE, channel_names=("CT",), intensity=st)
    for cfg in p.configurations.values():
        (n,) = cfg.normalization
        assert (n.scheme, n.clip_low, n.clip_high, n.mean, n.std) == ("ct", -950.0, 1400.0, 40.0, 120.0)
        assert n.use_nonzero_mask is False


def test_mri_normalisation_and_nonzero_mask_rule():
    uncropped = plan(*HIPPO_LIKE, channel_names=("MRI",), relative=0.9)
    (n,) = uncropped.configuration().normalization
    assert n.scheme == "zscore" and n.use_nonzero_mask is False
    cropped = plan(*HIPPO_LIKE, channel_names=("T2",), relative=0.5)
    (n,) = cropped.configuration().normalization
    assert n.scheme == "zscore" and n.use_nonzero_mask is True
    both = plan(*HIPPO_LIKE, channel_names=("ct", "noNorm"), relative=0.5)
    schemes = [(n.scheme, n.use_nonzero_mask) for n in both.configuration().normalization]
    assert schemes == [("ct", False), ("none", False)]


def test_2d_and_3d_fullres_share_preprocessed_data():
    p = plan(*PROSTATE)
    assert p.configuration("2d").data_identifier == p.configuration("3d_fullres").data_identifier


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
    assert d["configurations"]["3d_fullres"]["patch_size"] == [112, 160, 128]
    assert "median_spacing" in d["notes"]["spacing"]


def test_edited_inconsistent_plan_is_refused(tmp_path):
    p = plan(*HIPPO_LIKE)
    d = p.to_dict()
    d["configurations"]["3d_fullres"]["patch_size"] = [36, 56, 40]
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
    assert net.precision == "bf16" and net.base_features == 16 and net.features_per_stage()[0] == 16
