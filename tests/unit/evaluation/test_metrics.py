"""Metrics on hand-built masks: Dice/IoU, HD95 in mm with anisotropic spacing, surface Dice, empty cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from medseg.evaluation.metrics import (
    case_metrics,
    dice_from_counts,
    dice_iou,
    hd95_and_surface_dice,
    overlap_counts,
)


def test_dice_iou_hand_counted():
    pred = np.zeros((4, 4, 4), bool)
    ref = np.zeros((4, 4, 4), bool)
    pred[0, 0, :3] = True  # 3 voxels
    ref[0, 0, 1:] = True  # 3 voxels, 2 shared
    dice, iou = dice_iou(pred, ref)
    assert dice == pytest.approx(2 * 2 / 6)
    assert iou == pytest.approx(2 / 4)


def test_empty_conventions():
    empty = np.zeros((3, 5, 5), bool)
    some = empty.copy()
    some[1, 2, 2] = True
    assert dice_iou(empty, empty) == (1.0, 1.0)
    assert hd95_and_surface_dice(empty, empty, (1, 1, 1)) == (0.0, 1.0)
    assert dice_iou(empty, some) == (0.0, 0.0)
    hd, nsd = hd95_and_surface_dice(empty, some, (1, 1, 1))
    assert math.isinf(hd) and nsd == 0.0
    m = case_metrics(np.zeros((3, 5, 5), np.uint8), some.astype(np.uint8), (1, 1, 1), [1, 2])
    assert m[1]["hd95_undefined"] and m[1]["dice"] == 0.0
    assert m[2] == {
        "dice": 1.0,
        "iou": 1.0,
        "n_pred": 0,
        "n_ref": 0,
        "hd95": 0.0,
        "hd95_undefined": False,
        "surface_dice": 1.0,
    }


def test_hd95_uses_anisotropic_spacing_in_mm():
    pred = np.zeros((10, 10, 10), bool)
    ref = np.zeros((10, 10, 10), bool)
    pred[2, 5, 5] = True
    ref[4, 5, 5] = True  # 2 voxels apart along Z
    hd, nsd = hd95_and_surface_dice(pred, ref, (3.0, 1.0, 0.5))
    assert hd == pytest.approx(6.0)  # 2 voxels x 3 mm
    assert nsd == 0.0
    ref2 = np.zeros_like(ref)
    ref2[2, 5, 9] = True  # 4 voxels apart along X
    assert hd95_and_surface_dice(pred, ref2, (3.0, 1.0, 0.5))[0] == pytest.approx(2.0)
    assert hd95_and_surface_dice(pred, ref2, (3.0, 1.0, 0.5), tolerance_mm=2.0)[1] == 1.0


def test_shifted_box_hd95():
    ref = np.zeros((12, 20, 20), bool)
    ref[3:9, 5:15, 5:15] = True
    pred = np.roll(ref, 2, axis=1)  # shift 2 voxels along Y (0.8 mm each)
    hd, _ = hd95_and_surface_dice(pred, ref, (2.5, 0.8, 1.1))
    assert hd == pytest.approx(1.6)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_monai_on_random_blobs(seed):
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.random((10, 24, 20)), 2) > 0.5
    b = ndimage.gaussian_filter(rng.random((10, 24, 20)), 2) > 0.5
    spacing = (3.0, 0.7, 1.3)
    hd, nsd = hd95_and_surface_dice(a, b, spacing, tolerance_mm=1.5)
    ta, tb = torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float()
    ref_hd = compute_hausdorff_distance(ta, tb, percentile=95, spacing=spacing).item()
    ref_nsd = compute_surface_dice(
        torch.cat([1 - ta, ta], 1), torch.cat([1 - tb, tb], 1), class_thresholds=[1.5], spacing=spacing
    ).item()
    assert hd == pytest.approx(ref_hd, rel=1e-5)
    assert nsd == pytest.approx(ref_nsd, rel=1e-5)


def test_overlap_counts_and_dice_from_counts():
    pred = np.array([0, 1, 1, 2, 2, 2, 0])
    ref = np.array([0, 1, 2, 2, 2, 0, 0])
    counts = overlap_counts(pred, ref, 4)
    np.testing.assert_array_equal(counts[1], [1, 2, 1])
    np.testing.assert_array_equal(counts[2], [2, 3, 3])
    dice = dice_from_counts(counts)
    assert dice[1] == pytest.approx(2 / 3) and dice[2] == pytest.approx(4 / 6)
    assert dice[3] == 1.0  # absent from both
