"""Normalisation schemes produce the values their definitions say."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import PlanError
from medseg.planning.plan import NormalizationSpec
from medseg.preprocessing import normalize, normalize_channel


def test_ct_clips_then_uses_dataset_statistics():
    x = np.array([[[-2000.0, -100.0, 0.0, 50.0, 300.0, 3000.0]]], dtype=np.float32)
    spec = NormalizationSpec("ct", clip_low=-100.0, clip_high=300.0, mean=50.0, std=100.0)
    out = normalize_channel(x, spec)
    np.testing.assert_allclose(out.ravel(), [-1.5, -1.5, -0.5, 0.0, 2.5, 2.5], rtol=1e-6)
    assert out.dtype == np.float32


def test_ct_zero_std_does_not_divide_by_zero():
    x = np.full((2, 2, 2), 7.0, dtype=np.float32)
    out = normalize_channel(x, NormalizationSpec("ct", clip_low=0.0, clip_high=10.0, mean=7.0, std=0.0))
    assert np.all(np.isfinite(out)) and np.all(out == 0)


def test_zscore_whole_image():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 7, 8)) * 30 + 500).astype(np.float32)
    out = normalize_channel(x, NormalizationSpec("zscore"))
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-4


def test_zscore_inside_nonzero_mask_sets_outside_to_zero():
    rng = np.random.default_rng(1)
    x = np.zeros((6, 8, 8), dtype=np.float32)
    mask = np.zeros(x.shape, dtype=bool)
    mask[1:5, 2:7, 1:6] = True
    x[mask] = rng.normal(200, 20, mask.sum())
    out = normalize_channel(x, NormalizationSpec("zscore", use_nonzero_mask=True), mask)
    assert np.all(out[~mask] == 0)
    assert abs(out[mask].mean()) < 1e-4 and abs(out[mask].std() - 1) < 1e-4
    # without the mask the zeros would pull the mean down: values differ
    plain = normalize_channel(x, NormalizationSpec("zscore"), mask)
    assert not np.allclose(plain[mask], out[mask])


def test_none_keeps_values_and_channels_get_their_own_scheme():
    x = np.stack([np.full((2, 3, 4), 5.0), np.arange(24, dtype=float).reshape(2, 3, 4)]).astype(np.float32)
    out = normalize(x, [NormalizationSpec("none"), NormalizationSpec("zscore")])
    np.testing.assert_array_equal(out[0], 5.0)
    assert abs(out[1].mean()) < 1e-5


def test_bad_specs_are_refused():
    x = np.zeros((1, 2, 2, 2), dtype=np.float32)
    with pytest.raises(PlanError, match="2 normalization entries"):
        normalize(x, [NormalizationSpec("none")] * 2)
    with pytest.raises(PlanError, match="clip_low"):
        normalize(x, [NormalizationSpec("ct")])
    with pytest.raises(PlanError, match="unknown normalization"):
        normalize(x, [NormalizationSpec("minmax")])
