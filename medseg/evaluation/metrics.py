"""Overlap and surface metrics of binary masks, in mm with anisotropic spacing.

Conventions (documented, relied on by ``evaluate_folders`` and ``find_best``):

- **Both masks empty** (the structure is absent and none was predicted): Dice = 1, IoU = 1, HD95 = 0,
  surface Dice = 1 - a correct prediction.
- **Exactly one mask empty**: Dice = 0, IoU = 0, surface Dice = 0 and HD95 is undefined (infinite);
  it is returned as ``inf`` here and stored as ``null`` with ``"hd95_undefined": true`` in JSON/CSV
  output. Means of HD95 skip undefined values and report how many were skipped.

Surfaces are the mask voxels that have a face-neighbour outside the mask (``mask XOR erode(mask)``, with
voxels on the image border counting as surface), as MONAI's ``get_mask_edges`` defines them. Distances
are Euclidean between voxel centres, in mm, computed with ``scipy.ndimage.distance_transform_edt`` using
the voxel spacing, so anisotropic spacing is handled exactly. HD95 is the larger of the two directed 95th
percentile surface distances (MONAI's ``compute_hausdorff_distance(..., percentile=95)``); surface Dice
at tolerance ``tau`` mm is the fraction of both surfaces lying within ``tau`` of the other surface
(Nikolov et al. 2018, MONAI's ``compute_surface_dice``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def dice_iou(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks of equal shape (both empty -> ``(1.0, 1.0)``)."""
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    if n_pred == 0 and n_ref == 0:
        return 1.0, 1.0
    inter = int(np.count_nonzero(pred & ref))
    dice = 2.0 * inter / (n_pred + n_ref)
    iou = inter / (n_pred + n_ref - inter)
    return dice, iou


def _bbox_union(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    any_mask = a | b
    slices = []
    for axis in range(any_mask.ndim):
        other = tuple(i for i in range(any_mask.ndim) if i != axis)
        idx = np.flatnonzero(any_mask.any(axis=other))
        slices.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(slices)


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, border_value=0)
    return mask ^ eroded


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm between two non-empty boolean masks.

    Returns:
        ``(d_pred_to_ref, d_ref_to_pred)``: for every surface voxel of ``pred`` the distance to the
        nearest surface voxel of ``ref``, and vice versa (1D float64 arrays, mm).
    """
    crop = _bbox_union(pred, ref)
    # crop to the union's bounding box (+1 voxel) - distances between voxels do not depend on the crop,
    # and the image border stays a border only where the masks touch it
    pad = [(1 if s.start > 0 else 0, 1 if s.stop < n else 0) for s, n in zip(crop, pred.shape)]
    crop = tuple(slice(s.start - p[0], s.stop + p[1]) for s, p in zip(crop, pad))
    p, r = pred[crop], ref[crop]
    sp = _surface(p)
    sr = _surface(r)
    spacing = tuple(float(s) for s in spacing)
    dist_to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return dist_to_ref[sp], dist_to_pred[sr]


def hd95_and_surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 1.0
) -> tuple[float, float]:
    """95th percentile Hausdorff distance (mm) and surface Dice at ``tolerance_mm``.

    Both empty -> ``(0.0, 1.0)``; one empty -> ``(inf, 0.0)`` (see the module docstring).
    """
    has_p = bool(pred.any())
    has_r = bool(ref.any())
    if not has_p and not has_r:
        return 0.0, 1.0
    if not has_p or not has_r:
        return float("inf"), 0.0
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    hd95 = max(float(np.percentile(d_pr, 95)), float(np.percentile(d_rp, 95)))
    nsd = (np.count_nonzero(d_pr <= tolerance_mm) + np.count_nonzero(d_rp <= tolerance_mm)) / (d_pr.size + d_rp.size)
    return hd95, float(nsd)


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    label_ids: Sequence[int],
    tolerance_mm: float = 1.0,
    surface: bool = True,
) -> dict[int, dict]:
    """Per-label metrics of one case.

    Args:
        pred, ref: integer label maps ``(Z, Y, X)`` (original label ids), same shape.
        spacing: voxel size in mm, ``(Z, Y, X)``.
        label_ids: labels to evaluate (usually the foreground ids).
        tolerance_mm: surface Dice tolerance.
        surface: also compute HD95 and surface Dice (slower).

    Returns:
        ``{label: {"dice", "iou", "hd95", "hd95_undefined", "surface_dice", "n_pred", "n_ref"}}``;
        ``hd95`` is ``inf`` where undefined (exactly one mask empty), ``None`` when ``surface`` is False.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    out: dict[int, dict] = {}
    for lab in label_ids:
        p = pred == lab
        r = ref == lab
        dice, iou = dice_iou(p, r)
        entry: dict = {"dice": dice, "iou": iou, "n_pred": int(p.sum()), "n_ref": int(r.sum())}
        if surface:
            hd, nsd = hd95_and_surface_dice(p, r, spacing, tolerance_mm)
            entry.update(hd95=hd, hd95_undefined=not np.isfinite(hd), surface_dice=nsd)
        else:
            entry.update(hd95=None, hd95_undefined=False, surface_dice=None)
        out[int(lab)] = entry
    return out


def overlap_counts(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class ``(true positives, predicted voxels, reference voxels)`` of two class-index maps.

    Args:
        pred, ref: integer maps with values in ``0..num_classes-1`` (class indices), same shape.

    Returns:
        int64 array ``(num_classes, 3)``; one pass over the voxels (``np.bincount``).
    """
    p = pred.ravel().astype(np.int64, copy=False)
    r = ref.ravel().astype(np.int64, copy=False)
    conf = np.bincount(p * num_classes + r, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return np.stack([np.diag(conf), conf.sum(1), conf.sum(0)], axis=1)


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice per row of :func:`overlap_counts` output (both empty -> 1)."""
    tp, n_pred, n_ref = counts[:, 0].astype(np.float64), counts[:, 1], counts[:, 2]
    denom = (n_pred + n_ref).astype(np.float64)
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 1.0)
