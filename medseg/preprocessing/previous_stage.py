"""A cascade's previous-stage segmentation as network input: one-hot channels on the preprocessed grid.

A cascade configuration (``3d_cascade_fullres``, ``ConfigurationPlan.previous_stage = "3d_lowres"``) trains
and predicts on the ``3d_fullres`` grid; its networks take, after the image channels, the previous stage's
segmentation as one one-hot channel per foreground label (channel ``C + k - 1`` is 1 where the previous
stage predicted class ``k``; :meth:`~medseg.planning.plan.Plan.network_in_channels`). Spatial augmentation
moves these channels with the image (linear interpolation of the one-hot maps); intensity augmentation
leaves them alone.

This module holds the array operations both training and prediction use: the one-hot channels, appending
them to an image, and mapping a segmentation of the original image grid onto a case's preprocessed grid.
Where training's previous-stage segmentations come from (the ``3d_lowres`` folds' cross-validated
predictions, cached in the work folder) is :mod:`medseg.training.previous_stage`; at prediction the
previous stage's ensemble segments the raw image first (:class:`medseg.inference.Predictor`).
"""

from __future__ import annotations

import numpy as np

from medseg.errors import MedsegError
from medseg.planning.plan import Plan
from medseg.preprocessing.case import CaseProperties, spacing_3d
from medseg.preprocessing.resampling import resample_segmentation


def onehot_previous_stage(classes: np.ndarray, num_foreground: int) -> np.ndarray:
    """One-hot foreground channels of a class-index map.

    Args:
        classes: ``(Z, Y, X)`` class indices ``0..num_foreground`` (0 = background; larger values, e.g. an
            ignore class, give no channel).
        num_foreground: foreground classes ``L`` (:attr:`Plan.previous_stage_channels`).

    Returns:
        float32 ``(L, Z, Y, X)``; channel ``k - 1`` is 1 where ``classes == k``.
    """
    out = np.zeros((num_foreground, *classes.shape), dtype=np.float32)
    for k in range(1, num_foreground + 1):
        out[k - 1][classes == k] = 1.0
    return out


def append_previous_stage(data: np.ndarray, classes: np.ndarray, plan: Plan) -> np.ndarray:
    """The network input of a cascade: image ``(C, Z, Y, X)`` + one-hot previous stage ``(L, Z, Y, X)``.

    Args:
        data: the preprocessed image, float ``(C, Z, Y, X)``.
        classes: the previous stage's class indices on the same grid, ``(Z, Y, X)``.
        plan: the plan (its number of foreground labels gives ``L``).

    Returns:
        float32 ``(C + L, Z, Y, X)``.

    Raises:
        MedsegError: the segmentation's grid differs from the image's.
    """
    if tuple(classes.shape) != tuple(data.shape[1:]):
        raise MedsegError(
            f"the previous stage's segmentation has shape {list(classes.shape)}, the image "
            f"{list(data.shape[1:])}; they must lie on the same grid"
        )
    onehot = onehot_previous_stage(classes, plan.previous_stage_channels)
    return np.concatenate([np.asarray(data, dtype=np.float32), onehot], axis=0)


def to_preprocessed_grid(classes: np.ndarray, props: CaseProperties) -> np.ndarray:
    """Map a class-index map of the original image grid onto the case's preprocessed grid.

    The inverse of :func:`~medseg.preprocessing.revert_to_original` for segmentations: crop to
    ``props.bbox``, resample from ``props.shape_after_crop`` to ``props.shape_after_resample`` (one-hot linear;
    nearest along the coarse axis of anisotropic data), as preprocessing does with a label.

    Args:
        classes: ``props.geometry.shape`` class indices (``(Z, Y, X)``, or ``(Y, X)`` for a 2D image).
        props: the case's properties in the target configuration.

    Returns:
        ``props.shape_after_resample`` class indices ``(z, y, x)``, dtype of ``classes``.

    Raises:
        MedsegError: ``classes`` does not have the original image's shape.
    """
    if tuple(classes.shape) != tuple(props.geometry.shape):
        raise MedsegError(
            f"{props.case_id}: previous-stage segmentation of shape {list(classes.shape)}, but the "
            f"image has shape {list(props.geometry.shape)}"
        )
    arr = classes[None] if props.geometry.ndim == 2 else classes
    cropped = np.ascontiguousarray(arr[tuple(slice(a, b) for a, b in props.bbox)])
    spacing = spacing_3d(props.geometry, props.spacing_after_resample)
    return resample_segmentation(cropped, props.shape_after_resample, spacing, props.spacing_after_resample)
