"""Region-based plans (nnU-Net v2): region probabilities -> label maps, label maps -> region masks.

A region plan's network has one sigmoid output per region (:attr:`medseg.planning.plan.Plan.regions`).
Its probabilities become a label map with ``regions_class_order``: starting from background 0, for each
region ``i`` in order the voxels with ``p_i > 0.5`` get ``regions_class_order[i]`` (later regions overwrite
earlier ones). Evaluation compares regions, not labels: the region mask of a label map holds the voxels
whose label id is in the region.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from medseg.preprocessing.labels import label_dtype, seg_dtype

if TYPE_CHECKING:
    from medseg.planning.plan import Plan

#: Probability above which a voxel belongs to a region.
REGION_THRESHOLD = 0.5


def regions_to_labels(
    probs: np.ndarray, regions_class_order: Sequence[int], threshold: float = REGION_THRESHOLD
) -> np.ndarray:
    """Region probabilities ``(R, *spatial)`` (sigmoid, not logits) -> label ids ``(*spatial)``.

    Args:
        probs: one probability map per region, in region order.
        regions_class_order: the label id written for each region.
        threshold: a voxel is in region ``i`` when ``probs[i] > threshold``.

    Returns:
        Label ids (uint8 when every id < 256, else wider): 0 where no region is predicted, else the id of
        the last region (in order) predicted there.
    """
    if probs.shape[0] != len(regions_class_order):
        raise ValueError(
            f"{probs.shape[0]} region probability maps but regions_class_order has {len(regions_class_order)} entries"
        )
    out = np.zeros(probs.shape[1:], dtype=label_dtype([0, *regions_class_order]))
    for p, lab in zip(probs, regions_class_order):
        out[p > threshold] = lab
    return out


def regions_to_classes(
    probs: np.ndarray, label_ids: Sequence[int], regions_class_order: Sequence[int], threshold: float = REGION_THRESHOLD
) -> np.ndarray:
    """Like :func:`regions_to_labels` but writes class indices (positions in ``label_ids``), the form
    :func:`~medseg.preprocessing.revert.export_segmentation` and ``Predictor.indices_to_labels`` take."""
    index = {int(v): i for i, v in enumerate(label_ids)}
    classes = [index[int(v)] for v in regions_class_order]
    return regions_to_labels(probs, classes, threshold).astype(seg_dtype(len(label_ids)), copy=False)


def probabilities_to_classes(probs: np.ndarray, plan: Plan) -> np.ndarray:
    """Network probabilities ``(K or R, *spatial)`` -> class indices ``(*spatial)``: the argmax of softmax
    probabilities, or for a region plan its regions turned into labels (:func:`regions_to_classes`)."""
    if plan.is_region_based:
        assert plan.regions_class_order is not None
        return regions_to_classes(probs, plan.label_ids, plan.regions_class_order)
    return probs.argmax(0).astype(seg_dtype(len(plan.label_ids)), copy=False)


def region_masks(labels: np.ndarray, regions: Sequence[Sequence[int]]) -> np.ndarray:
    """Label ids ``(*spatial)`` -> bool ``(R, *spatial)``: voxel in region ``r`` iff its id is in ``regions[r]``."""
    return np.stack([np.isin(labels, np.asarray(list(r))) for r in regions])


def region_key(region: Sequence[int]) -> str:
    """Key of a region in metrics files (nnU-Net's): ``"3"`` for one id, ``"(1, 2, 3)"`` for several."""
    ids = tuple(int(i) for i in region)
    return str(ids[0]) if len(ids) == 1 else str(ids)


def dice_per_region(
    pred: np.ndarray, ref: np.ndarray, regions: Sequence[Sequence[int]], ignore_label: int | None = None
) -> dict[str, float | None]:
    """Dice of each region between label maps (None when a region is empty in both).

    Voxels where ``ref`` holds ``ignore_label`` are left out of prediction and reference.
    """
    if ignore_label is not None:
        keep = ref != ignore_label
        pred, ref = pred[keep], ref[keep]
    out: dict[str, float | None] = {}
    for reg in regions:
        p, r = np.isin(pred, list(reg)), np.isin(ref, list(reg))
        denom = int(p.sum()) + int(r.sum())
        out[region_key(reg)] = None if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom
    return out


__all__ = [
    "REGION_THRESHOLD",
    "dice_per_region",
    "probabilities_to_classes",
    "region_key",
    "region_masks",
    "regions_to_classes",
    "regions_to_labels",
]
