"""Whole-image intensity percentiles, recorded per training case and compared at prediction time.

The input guard (:mod:`medseg.inference.input_guard`) compares a new image's percentiles with the training
cases' own, so both sides are computed here, the same way.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PERCENTILE_VOXELS", "image_percentiles"]

#: at most this many voxels (an even stride through the image) go into :func:`image_percentiles`
PERCENTILE_VOXELS = 1_000_000


def image_percentiles(image: np.ndarray) -> tuple[tuple[float, float, float], ...]:
    """The 0.5th, 50th and 99.5th percentile of every channel over the whole image.

    Large images are read with an even stride (at most :data:`PERCENTILE_VOXELS` voxels per channel), so the
    result is deterministic and costs about a second on a whole-body CT.

    Args:
        image: ``(C, *spatial)``, any numeric dtype, in the image's own units.

    Returns:
        one ``(p0.5, p50, p99.5)`` per channel (NaN for an empty image).
    """
    out = []
    for channel in image:
        flat = np.asarray(channel).reshape(-1)
        step = max(1, -(-flat.size // PERCENTILE_VOXELS))
        values = flat[::step].astype(np.float64)
        if values.size == 0:
            out.append((float("nan"),) * 3)
            continue
        low, mid, high = np.percentile(values, [0.5, 50.0, 99.5])
        out.append((float(low), float(mid), float(high)))
    return tuple(out)
