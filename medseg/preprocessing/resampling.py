"""Resampling images, segmentations and probability maps between voxel grids.

Grid convention: a resample from ``n`` to ``m`` voxels along an axis keeps the field of view — the outer
faces of the first and last voxels stay where they are — so output voxel ``j`` samples the input at
``(j + 0.5) * n / m - 0.5`` (voxel-centre alignment, as ``skimage.transform.resize`` and
``scipy.ndimage.zoom(grid_mode=True)`` do). Resampling there and back with the same shapes is therefore
consistent, which is what keeps predictions registered to the original scan.

Rules (the ones nnU-Net established, reimplemented here):

* images: third-order spline; labels: one-hot linear interpolation (each class as a 0/1 map, linear,
  argmax) which keeps thin and small structures far better than nearest neighbour;
* anisotropic data (largest / smallest spacing > 3 in the source or the target grid, with a single
  coarsest axis): in-plane interpolation slice by slice, and nearest neighbour along the coarse axis, so
  that thick slices are not smeared into each other;
* when the shape does not change nothing is resampled.

Images and probabilities are resampled axis by axis (exact for axis-aligned spline interpolation, and
several times faster than 3D ``scipy.ndimage`` calls); boundaries are half-sample symmetric ("reflect").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: Largest / smallest spacing ratio above which the coarse axis is treated separately.
ANISOTROPY_THRESHOLD = 3.0


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Shape of ``shape`` voxels at ``spacing`` once resampled to ``new_spacing`` (mm, same axis order).

    ``round(shape * spacing / new_spacing)``, at least 1 per axis.
    """
    if not (len(shape) == len(spacing) == len(new_spacing)):
        raise ValueError(
            f"shape {list(shape)}, spacing {list(spacing)} and new spacing {list(new_spacing)} differ in length"
        )
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def _single_coarsest_axis(spacing: Sequence[float]) -> int | None:
    sp = np.asarray(spacing, dtype=float)
    coarse = np.flatnonzero(np.isclose(sp, sp.max(), rtol=1e-6, atol=0.0))
    return int(coarse[0]) if coarse.size == 1 else None


def anisotropic_axis(
    spacing: Sequence[float], new_spacing: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD
) -> int | None:
    """The axis to resample separately (nearest neighbour), or None for plain 3D interpolation.

    The source grid decides when it is anisotropic (``max / min > threshold``), else the target grid. When
    two axes share the coarsest spacing (e.g. ``(0.25, 1.2, 1.2)``) there is no single slice axis and None
    is returned.
    """
    for sp in (spacing, new_spacing):
        if max(sp) / min(sp) > threshold:
            return _single_coarsest_axis(sp)
    return None


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Fold indices into ``[0, n)`` by half-sample symmetric reflection (``-1 -> 0``, ``n -> n - 1``)."""
    m = np.mod(idx, 2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def _axis_weights(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices ``(n_out, taps)`` and weights of each output sample along one axis."""
    c = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        idx = np.floor(c + 0.5)[:, None]
        w = np.ones_like(idx)
    elif order == 1:
        f = np.floor(c)
        t = c - f
        idx = np.stack([f, f + 1], 1)
        w = np.stack([1 - t, t], 1)
    elif order == 3:  # cubic B-spline weights at offsets -1, 0, 1, 2
        f = np.floor(c)
        t = c - f
        idx = np.stack([f - 1, f, f + 1, f + 2], 1)
        w = np.stack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], 1) / 6.0
    else:
        raise ValueError(f"interpolation order must be 0, 1 or 3, got {order}")
    return _reflect(idx.astype(np.intp), n_in), w.astype(np.float32)


def _resample_axis(x: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """Resample ``x`` along one axis to ``n_out`` samples (spline ``order`` 0, 1 or 3); float32 result.

    Tensor-product splines with an axis-aligned scaling are separable, so resampling axis by axis gives
    exactly the 3D spline result (``scipy.ndimage.zoom(..., grid_mode=True, mode="reflect")``) at a fraction
    of the cost: 4 taps per pass instead of 64 per voxel for cubic.
    """
    n_in = x.shape[axis]
    if n_in == n_out:
        return x.astype(np.float32, copy=False)
    if order == 0:
        return np.take(x, _nearest_indices(n_in, n_out), axis=axis).astype(np.float32, copy=False)
    if order == 3:
        x = ndimage.spline_filter1d(x, 3, axis=axis, mode="reflect", output=np.float32)
    idx, w = _axis_weights(n_in, n_out, order)
    src = np.moveaxis(x, axis, 0)
    shape = (n_out,) + (1,) * (x.ndim - 1)
    out = src[idx[:, 0]].astype(np.float32, copy=False) * w[:, 0].reshape(shape)
    for t in range(1, idx.shape[1]):
        out += src[idx[:, t]] * w[:, t].reshape(shape)
    return np.moveaxis(out, 0, axis)


def _resample_separable(x: np.ndarray, new_shape: Sequence[int], orders: Sequence[int]) -> np.ndarray:
    """Resample the trailing ``len(new_shape)`` axes of ``x``, axis by axis (shrinking axes first)."""
    lead = x.ndim - len(new_shape)
    axes = sorted(range(len(new_shape)), key=lambda a: new_shape[a] / x.shape[lead + a])
    for a in axes:
        x = _resample_axis(x, lead + a, int(new_shape[a]), orders[a])
    return np.ascontiguousarray(x, dtype=np.float32)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Input index sampled by each output index for nearest-neighbour resampling along one axis."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp)
    return np.minimum(idx, n_in - 1)


def _take_nearest(array: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    if array.shape[axis] == n_out:
        return array
    return np.take(array, _nearest_indices(array.shape[axis], n_out), axis=axis)


def resample_image(
    data: np.ndarray,
    new_shape: Sequence[int],
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    order: int = 3,
    order_coarse: int = 0,
) -> np.ndarray:
    """Resample an image to ``new_shape``.

    Args:
        data: ``(C, Z, Y, X)`` intensities.
        new_shape: target ``(z, y, x)``.
        spacing / new_spacing: source and target spacing in mm (decide the anisotropic rule).
        order: spline order in-plane / in 3D (3 = cubic).
        order_coarse: interpolation order along the coarse axis of anisotropic data (0 = nearest).

    Returns:
        float32 ``(C, z, y, x)`` (``data`` itself, as float32, when the shape does not change).
    """
    new_shape = tuple(int(v) for v in new_shape)
    if tuple(data.shape[1:]) == new_shape:
        return data.astype(np.float32, copy=False)
    axis = anisotropic_axis(spacing, new_spacing)
    orders = [order] * len(new_shape)
    if axis is not None:
        orders[axis] = order_coarse
    out = np.empty((data.shape[0],) + new_shape, dtype=np.float32)
    for c in range(data.shape[0]):
        out[c] = _resample_separable(data[c], new_shape, orders)
    return out


def _axis_range(lo: int, hi: int, n_in: int, n_out: int) -> tuple[int, int]:
    """Output index range whose samples can touch input indices ``[lo, hi)`` under linear interpolation."""
    s = n_in / n_out
    start = 0 if lo == 0 else max(0, math.ceil((lo + 0.5) / s - 0.5) - 1)
    stop = n_out if hi == n_in else min(n_out, math.floor((hi - 0.5) / s - 0.5) + 2)
    return start, stop


def resample_onehot_linear(seg: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """Resample a class-index map by linear interpolation of each class's one-hot map and argmax.

    Only the foreground classes present are interpolated, each inside its own bounding box; the
    background probability is ``1 - sum(foreground)`` (linear interpolation keeps the partition of unity).
    Ties go to the lower class index, as ``argmax`` would.

    Args:
        seg: ``(Z, Y, X)`` non-negative integer class indices.
        new_shape: target ``(z, y, x)``.

    Returns:
        ``(z, y, x)`` class indices with ``seg``'s dtype.
    """
    new_shape = tuple(int(v) for v in new_shape)
    out = np.zeros(new_shape, dtype=seg.dtype)
    if seg.size == 0 or not seg.any():
        return out
    best = np.zeros(new_shape, dtype=np.float32)
    fg_sum = np.zeros(new_shape, dtype=np.float32)
    objects = ndimage.find_objects(seg.astype(np.int32, copy=False))
    for k, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        in_sl, out_sl, scale, offset = [], [], [], []
        for ax, s in enumerate(sl):
            n_in, n_out = seg.shape[ax], new_shape[ax]
            lo, hi = max(0, s.start - 1), min(n_in, s.stop + 1)  # one voxel of margin: zeros at the block edge
            start, stop = _axis_range(lo, hi, n_in, n_out)
            if start >= stop:
                break
            f = n_in / n_out
            in_sl.append(slice(lo, hi))
            out_sl.append(slice(start, stop))
            scale.append(f)
            offset.append(f * (start + 0.5) - 0.5 - lo)
        else:
            block = (seg[tuple(in_sl)] == k).astype(np.float32)
            values = ndimage.affine_transform(
                block,
                np.asarray(scale),
                offset=np.asarray(offset),
                output_shape=tuple(o.stop - o.start for o in out_sl),
                order=1,
                mode="nearest",
                output=np.float32,
            )
            region = tuple(out_sl)
            fg_sum[region] += values
            b = best[region]
            win = values > b
            b[win] = values[win]
            out[region][win] = k
    background = 1.0 - fg_sum
    out[background >= best - 1e-6] = 0  # ties (up to float error) go to background, as argmax would
    return out


def resample_segmentation(
    seg: np.ndarray, new_shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]
) -> np.ndarray:
    """Resample a class-index map (one-hot linear; nearest along the coarse axis of anisotropic data).

    Args:
        seg: ``(Z, Y, X)`` integer class indices ``0..K-1``.
        new_shape: target ``(z, y, x)``.
        spacing / new_spacing: source and target spacing in mm (decide the anisotropic rule).

    Returns:
        ``(z, y, x)`` class indices, same dtype as ``seg`` (``seg`` itself when the shape does not change).
    """
    new_shape = tuple(int(v) for v in new_shape)
    if tuple(seg.shape) == new_shape:
        return seg
    axis = anisotropic_axis(spacing, new_spacing)
    if axis is not None:
        seg = _take_nearest(seg, axis, new_shape[axis])
        if tuple(seg.shape) == new_shape:
            return np.ascontiguousarray(seg)
    return resample_onehot_linear(seg, new_shape)


def resample_probabilities(
    probs: np.ndarray, new_shape: Sequence[int], order: int = 1, out: np.ndarray | None = None
) -> np.ndarray:
    """Resample per-class probabilities ``(K, z, y, x)`` to ``(K, *new_shape)`` (linear by default).

    Linear interpolation keeps values in [0, 1] and their sum over classes equal to 1. Classes are
    processed one at a time (cache-friendly; no full-size temporaries beyond the result).

    Args:
        probs: ``(K, z, y, x)`` probabilities.
        new_shape: target spatial shape.
        order: 0, 1 or 3.
        out: optional float32 array (or view) of shape ``(K, *new_shape)`` to write into.

    Returns:
        float32 ``(K, *new_shape)`` (``out`` when given).
    """
    new_shape = tuple(int(v) for v in new_shape)
    if out is None:
        if tuple(probs.shape[1:]) == new_shape:
            return probs.astype(np.float32, copy=False)
        out = np.empty((probs.shape[0],) + new_shape, dtype=np.float32)
    for k in range(probs.shape[0]):
        out[k] = _resample_separable(probs[k], new_shape, [order] * len(new_shape))
    return out
