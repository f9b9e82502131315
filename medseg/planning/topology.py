"""Network topology from spacing and patch size: per-axis pooling and convolution kernel sizes.

The rule, stage by stage (starting from the input resolution):

* An axis may be downsampled (stride 2) at a stage when its feature map stays at least
  ``min_feature_map_size`` long afterwards and its current spacing is less than twice the smallest current
  spacing among the axes that can still be downsampled. Coarse axes of anisotropic data are therefore left
  alone until the finer axes have caught up. When only one axis is left to pool it needs room for at
  least ``3 * min_feature_map_size`` voxels (a single-axis bottleneck is not worth one more stage).
* A stage convolves with kernel 3 along axes whose current spacing is less than twice the smallest current
  spacing, and with kernel 1 along the others (in-plane convolutions for thick slices); once an axis has
  kernel 3 it keeps it. The bottleneck always uses kernel 3.
* After each stage the spacing of the pooled axes doubles.
* The patch is rounded up to a multiple of the total stride per axis.

This follows the published nnU-Net design rules, so that plans can be compared with nnU-Net's.
Shapes, spacings and patches are in array order ``(Z, Y, X)`` (``(Y, X)`` for 2D), spacing in mm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_FEATURE_MAP_SIZE = 4


@dataclass(frozen=True)
class Topology:
    """Network topology for one patch.

    Attributes:
        patch_size: the patch rounded up to be divisible by ``total_stride``.
        kernel_sizes: per stage, per axis convolution kernel size (1 or 3).
        strides: per stage, per axis downsampling factor; stage 0 is all ones.
    """

    patch_size: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def num_pool_per_axis(self) -> tuple[int, ...]:
        return tuple(sum(1 for s in self.strides if s[a] > 1) for a in range(len(self.patch_size)))

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Per axis product of the strides: the patch must be divisible by this."""
        return tuple(2**n for n in self.num_pool_per_axis)


def round_up(size: float, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= size``."""
    return int(math.ceil(size / multiple - 1e-9) * multiple)


def compute_topology(
    spacing: Sequence[float],
    patch_size: Sequence[float],
    min_feature_map_size: int = MIN_FEATURE_MAP_SIZE,
    max_poolings: int | None = None,
) -> Topology:
    """Derive poolings and kernel sizes for a patch at a spacing (see the module docstring).

    Args:
        spacing: voxel spacing in mm of the patch's axes, ``(Z, Y, X)`` or ``(Y, X)``.
        patch_size: candidate patch size (may be fractional, e.g. a median shape); rounded up.
        min_feature_map_size: smallest feature map edge allowed in the bottleneck.
        max_poolings: cap on poolings per axis (None: only the feature map size limits it).

    Returns:
        the :class:`Topology`, with the patch rounded up to a multiple of the total stride.
    """
    dims = len(spacing)
    if len(patch_size) != dims:
        raise ValueError(f"spacing {list(spacing)} and patch_size {list(patch_size)} differ in length")
    if any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {list(spacing)}")
    cur_spacing = [float(s) for s in spacing]
    cur_size = [float(p) for p in patch_size]
    pools = [0] * dims
    kernel = [1] * dims
    strides: list[tuple[int, ...]] = [(1,) * dims]
    kernels: list[tuple[int, ...]] = []
    limit = math.inf if max_poolings is None else max_poolings
    while True:
        big_enough = [a for a in range(dims) if cur_size[a] >= 2 * min_feature_map_size]
        if not big_enough:
            break
        finest = min(cur_spacing[a] for a in big_enough)
        axes = [a for a in big_enough if cur_spacing[a] / finest < 2 and pools[a] < limit]
        if not axes or (len(axes) == 1 and cur_size[axes[0]] < 3 * min_feature_map_size):
            break
        smallest = min(cur_spacing)
        for a in range(dims):
            if kernel[a] != 3 and cur_spacing[a] / smallest < 2:
                kernel[a] = 3
        kernels.append(tuple(kernel))
        stride = tuple(2 if a in axes else 1 for a in range(dims))
        strides.append(stride)
        for a in axes:
            pools[a] += 1
            cur_spacing[a] *= 2
            cur_size[a] = math.ceil(cur_size[a] / 2)
    kernels.append((3,) * dims)  # bottleneck
    total = [2**n for n in pools]
    patch = tuple(round_up(p, t) for p, t in zip(patch_size, total))
    return Topology(patch_size=patch, kernel_sizes=tuple(kernels), strides=tuple(strides))
