"""Inverse of preprocessing: back to the original grid, and export with the original ids and geometry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.io.image import write_image
from medseg.preprocessing.case import CaseProperties, spacing_3d
from medseg.preprocessing.labels import classes_to_labels
from medseg.preprocessing.resampling import resample_probabilities, resample_segmentation


def _full_shape_3d(props: CaseProperties) -> tuple[int, ...]:
    shape = tuple(props.geometry.shape)
    return (1,) + shape if len(shape) == 2 else shape


def revert_to_original(
    values: np.ndarray, props: CaseProperties, is_seg: bool = False, background_outside: bool = True
) -> np.ndarray:
    """Map a prediction on the preprocessed grid back onto the original image grid.

    Resamples from ``props.shape_after_resample`` to ``props.shape_after_crop`` (probabilities: linear,
    which keeps them in [0, 1] and summing to 1; segmentations: one-hot linear with nearest neighbour along
    the coarse axis of anisotropic data), then pastes the result into the original shape at ``props.bbox``.
    Outside the crop the background class gets probability 1 (segmentation: class 0).

    Args:
        values: ``(K, z, y, x)`` probabilities (not logits), or with ``is_seg`` ``(z, y, x)`` class indices.
        props: the case's :class:`CaseProperties`.
        is_seg: whether ``values`` is a class-index map.
        background_outside: probabilities: channel 0 is background and gets 1 outside the crop (softmax);
            False leaves every channel 0 there (a region plan's sigmoid probabilities).

    Returns:
        float32 ``(K, *props.geometry.shape)`` probabilities, or ``props.geometry.shape`` class indices in
        ``values``' dtype. For a 2D original image that is ``(K, Y, X)`` / ``(Y, X)``.

    Raises:
        ValueError: ``values`` does not have the preprocessed shape.
    """
    expected = tuple(props.shape_after_resample)
    spatial = tuple(values.shape) if is_seg else tuple(values.shape[1:])
    if spatial != expected or (not is_seg and values.ndim != 4):
        want = list(expected) if is_seg else ["K", *expected]
        raise ValueError(f"{props.case_id}: expected an array of shape {want}, got {list(values.shape)}")
    full = _full_shape_3d(props)
    region = tuple(slice(a, b) for a, b in props.bbox)
    original_spacing = spacing_3d(props.geometry, props.spacing_after_resample)
    if is_seg:
        seg = resample_segmentation(values, props.shape_after_crop, props.spacing_after_resample, original_spacing)
        out = np.zeros(full, dtype=values.dtype)
        out[region] = seg
        return out[0] if props.geometry.ndim == 2 else out
    values = values.astype(np.float32, copy=False)  # float16 from a large sliding-window accumulator
    out = np.zeros((values.shape[0],) + full, dtype=np.float32)
    if background_outside and tuple(props.shape_after_crop) != tuple(full):
        out[0] = 1.0  # background outside the crop
    resample_probabilities(values, props.shape_after_crop, out=out[(slice(None),) + region])
    return out[:, 0] if props.geometry.ndim == 2 else out


def export_segmentation(seg: np.ndarray, props: CaseProperties, label_ids: Sequence[int], path: str | Path) -> None:
    """Write a segmentation in the original grid with the original label ids and exact geometry.

    Args:
        seg: class indices ``0..K-1`` with shape ``props.geometry.shape`` (``(Z, Y, X)`` or ``(Y, X)``), e.g.
            ``revert_to_original(probs, props).argmax(0)``.
        props: the case's :class:`CaseProperties` (its geometry gives origin, spacing and direction).
        label_ids: ``plan.label_ids``; class ``k`` is written as ``label_ids[k]`` (uint8 when every id < 256,
            else uint16).
        path: output file (``.nii.gz``, ``.nrrd``, ...), written atomically.

    Raises:
        ValueError: wrong shape or class indices outside ``0..K-1``.
    """
    if tuple(seg.shape) != tuple(props.geometry.shape):
        raise ValueError(
            f"{props.case_id}: segmentation shape {list(seg.shape)} differs from the original image shape "
            f"{list(props.geometry.shape)}; call revert_to_original first"
        )
    write_image(classes_to_labels(seg, label_ids), props.geometry, path)
