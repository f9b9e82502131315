"""Shared helpers of the planning tests.

Most planner tests plan hand-built fingerprints (no files) with ``reference_estimator``: a memory model that counts
the feature-map values of a plain UNet and maps them to GB with nnU-Net v2's published reference (a 3D
network producing 560M values at batch 2 = 8 GB; a 2D one producing 85M values at batch 12 = 8 GB). With
it the planner's choices can be pinned to the values nnU-Net v2 (2.8.1) itself picks for the same
fingerprints; those expectations were produced by running nnU-Net's planner on them.

The time-budget tests start from ``hippocampus_like_plan``; real timings run single-threaded (``one_thread``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from medseg.io.dataset import DatasetInfo
from medseg.planning.plan import ConfigurationPlan, NetworkPlan, NormalizationSpec, Plan
from medseg.planning.planner import PlannerOptions, plan_dataset
from tests.helpers import network_plan


# ----------------------------------------------------------------------------------------------- planner helpers
def feature_map_values(net: NetworkPlan, num_classes: int) -> int:
    """Values a plain UNet (2 convs per stage, transposed-conv decoder) produces for one sample."""
    sizes, cur = [], list(net.patch_size)
    for s in net.spec.strides:
        cur = [c // st for c, st in zip(cur, s)]
        sizes.append(list(cur))
    feats = net.spec.features_per_stage()
    total = sum(net.spec.n_conv_per_stage * f * int(np.prod(sz)) for f, sz in zip(feats, sizes))
    total += sum((net.spec.n_conv_per_stage + 1) * feats[s] * int(np.prod(sizes[s])) for s in range(len(sizes) - 1))
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


# ----------------------------------------------------------------------------------------------- time-budget helpers
PATCH = (40, 56, 40)


def hippocampus_like_plan() -> Plan:
    net = network_plan(
        arch="unet",
        patch_size=PATCH,
        batch_size=7,
        kernel_sizes=((3, 3, 3),) * 4,
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
        base_features=32,
        max_features=320,
        estimated_memory_gb=1.2,
    )
    deeplab = network_plan(
        arch="deeplab",
        patch_size=PATCH,
        batch_size=5,
        kernel_sizes=((3, 3, 3),) * 4,
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
    )
    net2d = network_plan(
        arch="unet",
        patch_size=(56, 40),
        batch_size=64,
        kernel_sizes=((3, 3),) * 4,
        strides=((1, 1), (2, 2), (2, 2), (2, 2)),
        max_features=512,
    )
    norm = (NormalizationSpec("zscore"),)
    cfgs = {
        "3d_fullres": ConfigurationPlan(
            "3d_fullres",
            3,
            (1.0, 1.0, 1.0),
            (36, 50, 35),
            norm,
            {"unet": net, "deeplab": deeplab},
            data_identifier="spacing_1x1x1_zscore",
        ),
        "2d": ConfigurationPlan(
            "2d", 2, (1.0, 1.0, 1.0), (36, 50, 35), norm, {"unet": net2d}, data_identifier="spacing_1x1x1_zscore"
        ),
    }
    return Plan(
        "Hippocampus",
        ("MRI",),
        (0, 1, 2),
        ("background", "Anterior", "Posterior"),
        (1.0, 1.0, 1.0),
        (36, 50, 35),
        cfgs,
        default_configuration="2d",
        device="cuda",
        notes={"planner": "test"},
    ).validate()


@pytest.fixture
def one_thread():
    """Real timings with one thread: two threads on a busy 2-core machine can be 30x slower (OpenMP barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
