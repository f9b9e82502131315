"""How the sliding window covers a volume: the patch start positions along each axis, and the Gaussian
importance map that weights the voxels of every patch.

Patches along an axis are spread evenly from one border to the other, at most ``step x patch`` apart
(:func:`tile_starts`). Every patch's logits are weighted with a Gaussian centred on the patch (standard deviation
1/8 of the patch per axis by default, maximum 1 at the centre): voxels near a patch's border, whose receptive
field the patch truncates, count less than those near its centre, where neighbouring patches overlap
(:func:`gaussian_importance_map`). :mod:`medseg.inference.sliding_window` accumulates the weighted patches;
:mod:`medseg.inference.network_export` ships the same map with an exported network.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

#: Smallest value of the (max-normalised) Gaussian importance map; keeps far corners strictly positive.
GAUSSIAN_MIN = 1e-4


@lru_cache(maxsize=16)
def _gaussian_np(patch_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    """The map of :func:`gaussian_importance_map` as float32 numpy, cached per patch shape and sigma."""
    grids = []
    for p in patch_size:
        centre = (p - 1) / 2.0
        sigma = max(p * sigma_scale, 1e-6)
        coords = np.arange(p, dtype=np.float64)
        grids.append(np.exp(-((coords - centre) ** 2) / (2.0 * sigma**2)))
    g = grids[0]
    for axis_values in grids[1:]:
        g = np.multiply.outer(g, axis_values)
    g = g / g.max()
    return np.maximum(g, GAUSSIAN_MIN).astype(np.float32)


def gaussian_importance_map(
    patch_size: Sequence[int], sigma_scale: float = 1.0 / 8.0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Gaussian weights for one patch.

    Args:
        patch_size: patch shape (any number of axes).
        sigma_scale: standard deviation as a fraction of the patch size, per axis (default 1/8).
        device: where to put the map.

    Returns:
        float32 tensor of shape ``patch_size``, maximum 1 at the centre, symmetric, every value
        ``>= GAUSSIAN_MIN`` (never zero, so every voxel a patch covers gets a weight).
    """
    return torch.from_numpy(_gaussian_np(tuple(int(p) for p in patch_size), float(sigma_scale))).to(device)


def tile_starts(size: int, patch: int, step: float) -> list[int]:
    """Start indices of the patches along one axis of length ``size`` (``size >= patch``).

    Patches are spread evenly between ``0`` and ``size - patch`` so that the first and the last patch
    touch the borders and consecutive patches are at most ``step * patch`` apart.
    """
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch ({patch}); pad first")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    if size == patch:
        return [0]
    n = int(np.ceil((size - patch) / (patch * step))) + 1
    return sorted({int(round(v)) for v in np.linspace(0, size - patch, n)})
