"""Per-class intensity statistics of a preprocessed case (the evidence of the intensity-augmentation rule).

Computed on the normalised, resampled arrays that training sees, so the statistics are in the units the
network is trained in whatever the normalisation scheme (z-score per case, CT clipping, ...). Stored in
each case's properties (``CaseProperties.class_intensity``) and pooled over the training cases of a run by
:mod:`medseg.training.intensity_rule`.
"""

from __future__ import annotations

import numpy as np

#: classes with fewer voxels in a case are left out of its statistics (a speck says nothing of contrast)
MIN_CLASS_VOXELS = 20


def class_intensity_stats(data: np.ndarray, seg: np.ndarray, num_classes: int) -> dict[int, list[list[float]]]:
    """Mean and standard deviation of every channel inside every foreground class.

    Args:
        data: float ``(C, Z, Y, X)`` normalised intensities.
        seg: class indices ``(Z, Y, X)`` (0 background, ``1 .. num_classes - 1`` foreground; the ignore
            class ``num_classes`` and anything above is left out).
        num_classes: K, background included.

    Returns:
        class index -> one ``[mean, std]`` pair per channel, for the foreground classes present with at
        least :data:`MIN_CLASS_VOXELS` voxels.
    """
    flat = seg.reshape(-1).astype(np.int64)
    keep = (flat > 0) & (flat < num_classes)
    labels = flat[keep]
    counts = np.bincount(labels, minlength=num_classes)
    present = [k for k in range(1, num_classes) if counts[k] >= MIN_CLASS_VOXELS]
    out: dict[int, list[list[float]]] = {k: [] for k in present}
    for channel in data:
        values = channel.reshape(-1)[keep].astype(np.float64)
        sums = np.bincount(labels, weights=values, minlength=num_classes)
        squares = np.bincount(labels, weights=values * values, minlength=num_classes)
        for k in present:
            mean = sums[k] / counts[k]
            var = max(squares[k] / counts[k] - mean * mean, 0.0)
            out[k].append([round(float(mean), 6), round(float(np.sqrt(var)), 6)])
    return out
