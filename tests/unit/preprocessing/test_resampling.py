"""Resampling: shapes, accuracy on smooth images, one-hot labels, the anisotropic rule."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.preprocessing import (
    anisotropic_axis,
    compute_new_shape,
    resample_image,
    resample_probabilities,
    resample_segmentation,
)


def _centres(n: int, extent: float) -> np.ndarray:
    return (np.arange(n) + 0.5) * extent / n


def _smooth(shape, extent):
    zz, yy, xx = np.meshgrid(*[_centres(n, e) for n, e in zip(shape, extent)], indexing="ij")
    return np.sin(zz / 3.0) + np.cos(yy / 4.0) * np.sin(xx / 5.0 + 0.3)


def test_new_shape_rounds_physical_size():
    assert compute_new_shape((10, 20, 30), (2.0, 1.0, 0.5), (1.0, 1.0, 1.0)) == (20, 20, 15)
    assert compute_new_shape((7, 7, 1), (1.0, 1.0, 1.0), (0.3, 3.0, 5.0)) == (23, 2, 1)


@pytest.mark.parametrize(
    ("spacing", "target", "axis"),
    [
        ((3.0, 0.7, 0.7), (3.0, 0.7, 0.7), 0),
        ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), None),
        ((1.0, 1.0, 1.0), (1.0, 4.0, 1.0), 1),  # the target grid decides when the source is isotropic
        ((0.25, 1.2, 1.2), (0.25, 1.2, 1.2), None),  # two coarse axes: no single slice axis
        ((2.5, 1.0, 1.0), (2.5, 1.0, 1.0), None),  # ratio 2.5 <= 3
        ((0.8, 0.8, 5.0), (1.0, 1.0, 1.0), 2),
    ],
)
def test_anisotropic_axis(spacing, target, axis):
    assert anisotropic_axis(spacing, target) == axis


def test_smooth_image_is_preserved():
    shape, spacing, target = (20, 24, 22), (1.0, 1.0, 1.0), (0.8, 1.3, 0.7)
    extent = tuple(n * s for n, s in zip(shape, spacing))
    data = _smooth(shape, extent)[None].astype(np.float32)
    new_shape = compute_new_shape(shape, spacing, target)
    out = resample_image(data, new_shape, spacing, target)
    assert out.shape == (1, *new_shape) == (1, 25, 18, 31) and out.dtype == np.float32
    expected = _smooth(new_shape, extent)
    inner = (slice(3, -3),) * 3  # spline extrapolation half a voxel beyond the edges is less exact
    assert np.abs(out[0][inner] - expected[inner]).max() < 2e-3
    assert np.abs(out[0] - expected).max() < 0.05


def test_unchanged_shape_skips_resampling():
    data = np.random.default_rng(0).random((1, 10, 10, 10)).astype(np.float32)
    seg = (data[0] > 0.5).astype(np.int8)
    # 10 voxels at 1.0 mm -> 1.02 mm still gives 10 voxels: nothing to do
    assert resample_image(data, (10, 10, 10), (1.0,) * 3, (1.02, 1.0, 1.0)) is data
    assert resample_segmentation(seg, (10, 10, 10), (1.0,) * 3, (1.02, 1.0, 1.0)) is seg


def test_anisotropic_image_uses_nearest_along_coarse_axis():
    rng = np.random.default_rng(0)
    data = rng.random((1, 6, 16, 16)).astype(np.float32)
    out = resample_image(data, (12, 16, 16), (4.0, 1.0, 1.0), (2.0, 1.0, 1.0))
    for j in range(12):  # every output slice is exactly one input slice
        np.testing.assert_array_equal(out[0, j], data[0, j // 2])
    # the same upsampling on isotropic data interpolates (third order), so slices are new values
    iso = resample_image(data, (12, 16, 16), (1.0, 1.0, 1.0), (0.5, 1.0, 1.0))
    assert not any(np.allclose(iso[0, 1], data[0, k]) for k in range(6))


def test_anisotropic_image_in_plane_is_cubic_per_slice():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    data = rng.random((1, 5, 12, 10)).astype(np.float32)
    out = resample_image(data, (5, 24, 20), (5.0, 1.0, 1.0), (5.0, 0.5, 0.5))
    for k in range(5):
        ref = ndimage.zoom(data[0, k], 2.0, order=3, grid_mode=True, mode="reflect")
        np.testing.assert_allclose(out[0, k], ref, atol=1e-5)


def test_anisotropic_segmentation_takes_whole_slices():
    rng = np.random.default_rng(2)
    seg = rng.integers(0, 3, (6, 16, 16)).astype(np.int8)
    out = resample_segmentation(seg, (12, 16, 16), (4.0, 1.0, 1.0), (2.0, 1.0, 1.0))
    for j in range(12):
        np.testing.assert_array_equal(out[j], seg[j // 2])


def _sphere(shape, spacing, centre, radius):
    grids = np.meshgrid(*[_centres(n, n * s) for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius**2


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("radius", [2.5, 3.2])
def test_onehot_linear_beats_nearest_on_small_structures(radius):
    centre = (8.2, 7.9, 8.1)
    coarse = _sphere((16, 16, 16), (1.0,) * 3, centre, radius).astype(np.int8)
    truth = _sphere((40, 40, 40), (0.4,) * 3, centre, radius)
    linear = resample_segmentation(coarse, (40, 40, 40), (1.0,) * 3, (0.4,) * 3) == 1
    idx = np.minimum(np.floor((np.arange(40) + 0.5) * 16 / 40).astype(int), 15)
    nearest = coarse[np.ix_(idx, idx, idx)] == 1
    assert _dice(linear, truth) > _dice(nearest, truth) + 0.03


def test_label_set_and_dtype_kept_when_resampling():
    seg = np.zeros((20, 22, 24), dtype=np.int16)
    seg[2:15, 3:18, 4:20] = 1
    seg[5:9, 6:10, 8:12] = 2
    seg[10:12, 12:14, 14:16] = 3  # a 2x2x2 structure
    seg[16:19, 2:5, 2:5] = 200
    for target in [(0.8, 0.8, 0.8), (1.3, 0.7, 1.1)]:
        shape = compute_new_shape(seg.shape, (1.0,) * 3, target)
        out = resample_segmentation(seg, shape, (1.0,) * 3, target)
        assert out.shape == shape and out.dtype == np.int16
        assert set(np.unique(out)) == {0, 1, 2, 3, 200}


def test_probabilities_stay_a_distribution():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 6, 7, 8))
    probs = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
    out = resample_probabilities(probs, (9, 5, 13))
    assert out.shape == (4, 9, 5, 13)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    assert out.min() >= 0 and out.max() <= 1


def test_onehot_fast_path_equals_full_argmax():
    """Per-class bounding boxes and background = 1 - sum(foreground) give the full one-hot argmax."""
    from scipy import ndimage

    rng = np.random.default_rng(4)
    seg = np.zeros((13, 17, 11), dtype=np.int8)
    for k in range(1, 6):
        c = rng.integers(0, [13, 17, 11])
        r = rng.integers(1, 4, 3)
        seg[max(c[0] - r[0], 0) : c[0] + r[0], max(c[1] - r[1], 0) : c[1] + r[1], max(c[2] - r[2], 0) : c[2] + r[2]] = k
    for shape in [(20, 9, 26), (7, 30, 5), (13, 17, 31)]:
        onehot = np.stack(
            [
                ndimage.zoom(
                    (seg == k).astype(np.float64), np.divide(shape, seg.shape), order=1, grid_mode=True, mode="nearest"
                )
                for k in range(6)
            ]
        )
        ref = onehot.argmax(0)
        got = resample_segmentation(seg, shape, (1.0,) * 3, (1.0,) * 3)
        top2 = np.sort(onehot, axis=0)[-2:]
        ambiguous = top2[1] - top2[0] < 1e-5  # exact ties may go either way
        assert np.array_equal(got[~ambiguous], ref[~ambiguous])
        assert ambiguous.mean() < 0.05
