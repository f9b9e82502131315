"""Sliding window: an identity model must come back unchanged; Gaussian map and tiling properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.inference.sliding_window import (
    mirror_combinations,
    predict_sliding_window,
    shift_variants,
    shifted_shape,
    tta_variants,
)
from medseg.inference.tiling import GAUSSIAN_MIN, gaussian_importance_map, tile_starts


class Identity3d(torch.nn.Module):
    """Logits = 20 * input: the softmax of a 2-channel input, position by position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 5
        return 20.0 * x


class Identity2d(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4, "a 2D network must be fed (B, C, Y, X) slices"
        return 20.0 * x


class ShiftedIdentity3d(torch.nn.Module):
    """Not mirror-equivariant: averaging over flips must change its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * torch.roll(x, 1, dims=-1)


@pytest.mark.parametrize("shape", [(12, 20, 18), (5, 7, 6), (40, 9, 33)])  # larger, smaller, mixed vs patch
@pytest.mark.parametrize("mirror", [None, (0, 1, 2)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_identity_3d_reproduces_input(shape, mirror, batch_size):
    x = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
    out = predict_sliding_window(Identity3d(), x, (8, 8, 8), 2, mirror_axes=mirror, batch_size=batch_size)
    assert out.shape == (2, *shape) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.softmax(20.0 * x, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(3, 30, 21), (2, 5, 6)])
@pytest.mark.parametrize("mirror", [None, (0, 1)])
def test_identity_2d_slicewise_reproduces_input(shape, mirror):
    x = torch.rand((3, *shape), generator=torch.Generator().manual_seed(1))
    out = predict_sliding_window(Identity2d(), x, (16, 8), 3, mirror_axes=mirror, batch_size=4)
    assert out.shape == (3, *shape)
    torch.testing.assert_close(out, torch.softmax(20.0 * x, 0), atol=1e-5, rtol=0)


def test_probabilities_sum_to_one_and_bf16_close_to_fp32():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 3, padding=1)
    ).eval()
    x = torch.randn(1, 10, 11, 9)
    fp32 = predict_sliding_window(net, x, (8, 8, 8), 3, mirror_axes=(1,))
    bf16 = predict_sliding_window(net, x, (8, 8, 8), 3, mirror_axes=(1,), precision="bf16", batch_size=4)
    torch.testing.assert_close(fp32.sum(0), torch.ones(10, 11, 9), atol=1e-5, rtol=0)
    assert (fp32 - bf16).abs().max() < 0.05
    assert (fp32.argmax(0) == bf16.argmax(0)).float().mean() > 0.97


def test_single_tile_equals_plain_forward():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    x = torch.randn(1, 8, 8, 8)
    out = predict_sliding_window(net, x, (8, 8, 8), 2)
    with torch.no_grad():
        ref = torch.softmax(net(x[None])[0], 0)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_mirroring_averages_flipped_predictions():
    x = torch.rand(2, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    model = ShiftedIdentity3d()
    no_tta = predict_sliding_window(model, x, (8, 8, 8), 2)
    tta = predict_sliding_window(model, x, (8, 8, 8), 2, mirror_axes=(2,))
    torch.testing.assert_close(no_tta, torch.softmax(20.0 * torch.roll(x, 1, -1), 0), atol=1e-5, rtol=0)
    expected = torch.softmax(10.0 * (torch.roll(x, 1, -1) + torch.roll(x, -1, -1)), 0)
    torch.testing.assert_close(tta, expected, atol=1e-5, rtol=0)


def test_wrong_network_output_shape_is_reported():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return x[:, :, ::2]

    with pytest.raises(ValueError, match="network returned shape"):
        predict_sliding_window(Bad(), torch.zeros(2, 8, 8, 8), (8, 8, 8), 2)


def test_gaussian_map_properties():
    g = gaussian_importance_map((9, 16, 12)).numpy()
    assert g.shape == (9, 16, 12) and g.dtype == np.float32
    assert g.max() == pytest.approx(1.0, abs=1e-6)
    assert g.min() >= GAUSSIAN_MIN > 0
    np.testing.assert_allclose(g, g[::-1, ::-1, ::-1], atol=1e-7)  # symmetric about the centre
    assert g[4, 7, 5] > g[4, 7, 3] > g[4, 7, 1] > g[4, 7, 0]  # decreasing away from the centre
    assert np.unravel_index(g.argmax(), g.shape)[0] == 4
    # sigma is 1/8 of the patch: one sigma from the centre (odd size -> exact voxel) gives exp(-1/2)
    g1 = gaussian_importance_map((1, 1, 33)).numpy()[0, 0]
    assert g1[16 + 4] == pytest.approx(np.exp(-0.5) * g1[16] / 1.0, rel=0.05)


@pytest.mark.parametrize(
    "size,patch,step", [(10, 10, 0.5), (11, 10, 0.5), (100, 16, 0.5), (37, 8, 0.25), (50, 20, 1.0)]
)
def test_tile_starts_cover_axis(size, patch, step):
    starts = tile_starts(size, patch, step)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert all(b - a <= patch * step + 1e-9 for a, b in zip(starts, starts[1:]))
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()


def test_mirror_combinations():
    assert mirror_combinations(None) == [()]
    combos = mirror_combinations((0, 1, 2))
    assert len(combos) == 8 and combos[0] == () and len(set(combos)) == 8


def test_shift_variants_move_half_a_stride_apart():
    assert shift_variants((8, 8, 8), 1) == [(0, 0, 0)]
    assert shift_variants((8, 8, 8), 2) == [(-2, -2, -2), (2, 2, 2)]
    tetra = shift_variants((8, 8, 8), 4)
    assert len(tetra) == 4 and all(sum(v > 0 for v in c) % 2 == 0 for c in tetra)
    assert len(set(shift_variants((8, 8, 8), 8))) == 8
    assert shift_variants((16, 8, 4), 2) == [(-4, -2, -1), (4, 2, 1)]
    assert shift_variants((2, 8, 8), 8) == [(0, -2, -2), (0, -2, 2), (0, 2, -2), (0, 2, 2)]  # Z pooled once only
    assert shift_variants((2, 2, 2), 8) == [(0, 0, 0)]
    assert shift_variants((8, 8), 2) == [(-2, -2), (2, 2)]


def test_shifted_shape_grows_the_patch_axes_by_twice_the_offset():
    assert shifted_shape((10, 20, 30), (-2, 0, 3)) == (14, 20, 36)
    assert shifted_shape((10, 20, 30), (2, 2)) == (10, 24, 34)  # a 2D patch: Z is not shifted
    assert shifted_shape((1, 10, 20, 30), (0, 0, 0)) == (1, 10, 20, 30)


def test_tta_spends_the_passes_of_full_mirroring_on_flips_first():
    assert tta_variants((0, 1, 2), (8, 8, 8)) == ((0, 1, 2), [(0, 0, 0)])
    assert tta_variants((2,), (8, 8, 8)) == ((2,), [(-2, -2, -2), (2, 2, 2)])
    assert tta_variants(None, (8, 8)) == ((), [(-2, -2), (2, 2)])
    assert tta_variants((0, 1), (8, 8)) == ((0, 1), [(0, 0)])
    assert tta_variants((2,), (8, 8, 8), passes=2) == ((2,), [(0, 0, 0)])


@pytest.mark.parametrize("shape", [(12, 20, 18), (5, 7, 6)])
def test_shifts_leave_a_translation_equivariant_model_unchanged(shape):
    x = torch.rand((2, *shape), generator=torch.Generator().manual_seed(3))
    out = predict_sliding_window(Identity3d(), x, (8, 8, 8), 2, mirror_axes=(2,), shifts=[(-2, -2, -2), (2, 2, 2)])
    assert out.shape == (2, *shape)
    torch.testing.assert_close(out, torch.softmax(20.0 * x, 0), atol=1e-5, rtol=0)
    x2 = torch.rand((2, 3, 9, 11), generator=torch.Generator().manual_seed(4))
    out2 = predict_sliding_window(Identity2d(), x2, (8, 8), 2, shifts=[(-2, 2), (2, -2)], batch_size=4)
    torch.testing.assert_close(out2, torch.softmax(20.0 * x2, 0), atol=1e-5, rtol=0)


class PositionBias3d(torch.nn.Module):
    """Class-1 logit grows along the patch's X axis: the output depends on where the patch grid lies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-2.0, 2.0, x.shape[-1])
        return torch.cat([torch.zeros_like(x), x + ramp], 1)


def test_shifts_average_the_weighted_logits_of_each_grid_position():
    x = torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    out = predict_sliding_window(PositionBias3d(), x, (16, 16, 16), 2, shifts=[(-2, -2, -2), (2, 2, 2)])
    # the 8-voxel volume sits at patch offset 4 unshifted; the variants put it at 2 and at 6
    g = gaussian_importance_map((16, 16, 16))
    ramp = torch.linspace(-2.0, 2.0, 16)
    weights = [g[o : o + 8, o : o + 8, o : o + 8] for o in (2, 6)]
    logits = [x[0] + ramp[o : o + 8] for o in (2, 6)]
    mean = (weights[0] * logits[0] + weights[1] * logits[1]) / (weights[0] + weights[1])
    torch.testing.assert_close(out[1], torch.sigmoid(mean), atol=1e-5, rtol=0)
    unshifted = predict_sliding_window(PositionBias3d(), x, (16, 16, 16), 2)
    torch.testing.assert_close(unshifted[1], torch.sigmoid(x[0] + ramp[4:12]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one offset per patch axis"):
        predict_sliding_window(PositionBias3d(), x, (16, 16, 16), 2, shifts=[(1, 1)])


@pytest.mark.parametrize("shape", [(12, 20, 18), (5, 7, 6)])  # tiled, and padded into one tile
def test_half_accumulator_for_large_outputs_matches_float32(shape, monkeypatch):
    import medseg.inference.sliding_window as sw

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 9, 3, padding=1)
    ).eval()  # 9 classes: several chunks
    x = torch.randn(1, *shape)
    full = predict_sliding_window(net, x, (8, 8, 8), 9, mirror_axes=(0, 2))
    monkeypatch.setattr(sw, "HALF_ACCUMULATOR_BYTES", 0)  # every output counts as large
    half = predict_sliding_window(net, x, (8, 8, 8), 9, mirror_axes=(0, 2))
    assert full.dtype == torch.float32 and half.dtype == torch.float16
    torch.testing.assert_close(half.float().sum(0), torch.ones(shape), atol=5e-3, rtol=0)
    assert (half.float() - full).abs().max() < 2e-3
    assert (half.argmax(0) == full.argmax(0)).float().mean() > 0.99
