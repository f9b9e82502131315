"""medseg's Dice, HD95 and surface Dice against MONAI's ``compute_dice``, ``compute_hausdorff_distance`` and
``compute_surface_dice`` on real labels (hippocampus, CHAOS T2 at 7.7 mm slices) and on edge cases.

They agree to 1e-4 wherever both are defined; where one mask is empty MONAI returns NaN and medseg its documented
convention (``docs/evaluation.md``, "Agreement with MONAI"), which the last tests pin down.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from medseg.evaluation.metrics import dice_iou, hd95_and_surface_dice
from tests.conftest import shared_dataset

TOLERANCE = 1e-4
ANISOTROPIC = (3.0, 0.8, 1.2)  # (Z, Y, X) mm


def _monai(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float = 1.0) -> tuple[float, float, float]:
    """MONAI's Dice, HD95 (mm) and surface Dice of two boolean ``(Z, Y, X)`` masks (one-hot, background left out)."""

    def onehot(mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    p, r = onehot(pred), onehot(ref)
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks (NaN results)
        dice = compute_dice(p, r, include_background=False, ignore_empty=False).item()
        hd95 = compute_hausdorff_distance(p, r, include_background=False, percentile=95, spacing=sp).item()
        nsd = compute_surface_dice(p, r, [tolerance_mm], include_background=False, spacing=sp).item()
    return dice, hd95, nsd


def _medseg(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float = 1.0) -> tuple[float, float, float]:
    dice, _ = dice_iou(pred, ref)
    hd95, nsd = hd95_and_surface_dice(pred, ref, spacing, tolerance_mm)
    return dice, hd95, nsd


def _assert_agree(pred, ref, spacing, tolerance_mm=1.0, what=""):
    ours, theirs = _medseg(pred, ref, spacing, tolerance_mm), _monai(pred, ref, spacing, tolerance_mm)
    np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0, err_msg=f"{what}: (Dice, HD95, surface Dice)")
    return ours


def _label(dataset: str, case: str) -> tuple[np.ndarray, tuple[float, ...]]:
    img = sitk.ReadImage(str(shared_dataset(dataset) / "labelsTr" / f"{case}.nii.gz"))
    return sitk.GetArrayFromImage(img).astype(np.int64), tuple(img.GetSpacing()[::-1])


def _perturbed(ref: np.ndarray, seed: int) -> np.ndarray:
    """A plausible wrong prediction: dilated, 10% of its voxels dropped, shifted one voxel in-plane."""
    rng = np.random.default_rng(seed)
    grown = ndimage.binary_dilation(ref, iterations=1) & (rng.random(ref.shape) > 0.1)
    return np.roll(grown, 1, axis=1 + seed % 2)


@pytest.mark.parametrize("case", ["hippocampus_001", "hippocampus_003", "hippocampus_004"])
def test_real_hippocampus_labels_agree_at_true_and_anisotropic_spacing(case):
    labels, spacing = _label("hippocampus", case)
    for lab in (1, 2):
        ref = labels == lab
        pred = _perturbed(ref, lab)
        for sp, tol in ((spacing, 1.0), (ANISOTROPIC, 1.0), (ANISOTROPIC, 2.0)):
            dice, hd95, nsd = _assert_agree(pred, ref, sp, tol, f"{case} label {lab} spacing {sp} tolerance {tol}")
            assert 0 < dice < 1 and hd95 > 0 and 0 < nsd < 1  # a real disagreement, not a trivial case


def test_real_chaos_t2_labels_agree_at_7_7_mm_slices():
    labels, spacing = _label("chaos_t2", "chaost2_001")
    assert max(spacing) / min(spacing) > 5  # strongly anisotropic
    for lab in (1, 2):
        ref = labels == lab
        pred = ndimage.binary_erosion(ref, iterations=2) | np.roll(ref, 3, axis=2)
        _assert_agree(pred, ref, spacing, 1.0, f"chaos_t2 label {lab}")


def test_single_voxels_thin_structures_and_the_image_border_agree():
    z = np.zeros((8, 10, 12), bool)
    one = z.copy()
    one[3, 4, 5] = True
    other = z.copy()
    other[5, 4, 7] = True
    assert _assert_agree(one, one, (2.0, 1.0, 1.0), what="same voxel") == (1.0, 0.0, 1.0)
    dice, hd95, _ = _assert_agree(other, one, (2.5, 1.0, 0.7), what="voxels apart")
    assert dice == 0 and hd95 == pytest.approx(np.hypot(2 * 2.5, 2 * 0.7))
    # one-voxel-thick sheets, one voxel apart along the 0.6 mm axis, at anisotropic spacing
    thin, thin2 = z.copy(), z.copy()
    thin[2:6, 5, 1:11] = True
    thin2[2:6, 6, 2:11] = True
    _assert_agree(thin2, thin, (3.0, 0.6, 1.1), what="thin sheets")
    _assert_agree(thin2, thin, (3.0, 0.6, 1.1), 0.5, what="thin sheets, 0.5 mm tolerance")
    # a mask filling the image: its surface is the image border (both define it so)
    _assert_agree(np.ones_like(z), thin, (3.0, 0.6, 1.1), what="whole image")


def test_empty_masks_follow_medseg_conventions_where_monai_returns_nan():
    z = np.zeros((8, 10, 12), bool)
    one = z.copy()
    one[3, 4, 5] = True
    for pred, ref in ((z, one), (one, z)):  # empty prediction, empty reference
        ours, theirs = _medseg(pred, ref, ANISOTROPIC), _monai(pred, ref, ANISOTROPIC)
        assert ours[0] == theirs[0] == 0.0 and ours[2] == theirs[2] == 0.0  # Dice and surface Dice agree
        assert ours[1] == float("inf") and np.isnan(theirs[1])  # HD95 undefined: inf (stored as null) vs NaN
    ours, theirs = _medseg(z, z, ANISOTROPIC), _monai(z, z, ANISOTROPIC)
    assert ours == (1.0, 0.0, 1.0)  # both empty: a correct prediction
    assert theirs[0] == 1.0 and np.isnan(theirs[1]) and np.isnan(theirs[2])
