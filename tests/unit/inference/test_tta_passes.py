"""Fewer TTA passes than the flips (a shortened final validation), and stopping a prediction at a deadline."""

from __future__ import annotations

import pytest
import torch

from medseg.inference.sliding_window import PredictionStopped, predict_sliding_window, tta_variants


def test_fewer_passes_than_flips_mirror_fewer_axes_x_first():
    assert tta_variants((0, 1, 2), (8, 8, 8), passes=8) == ((0, 1, 2), [(0, 0, 0)])
    assert tta_variants((0, 1, 2), (8, 8, 8), passes=4) == ((1, 2), [(0, 0, 0)])
    assert tta_variants((0, 1, 2), (8, 8, 8), passes=3) == ((2,), [(0, 0, 0)])
    assert tta_variants((0, 1, 2), (8, 8, 8), passes=1) == ((), [(0, 0, 0)])
    assert tta_variants((2,), (8, 8, 8), passes=4) == ((2,), [(-2, -2, -2), (2, 2, 2)])
    assert tta_variants((2,), (8, 8, 8), passes=1) == ((), [(0, 0, 0)])
    assert tta_variants((0, 1), (8, 8), passes=2) == ((1,), [(0, 0)])


class _Counting(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        return torch.cat([x, -x], dim=1)


def test_should_stop_abandons_the_prediction_before_the_next_batch():
    model = _Counting()
    x = torch.rand((1, 16, 16, 16))
    full = predict_sliding_window(model, x, (8, 8, 8), 2, batch_size=1)
    assert full.shape == (2, 16, 16, 16) and model.batches == 27
    model.batches = 0
    with pytest.raises(PredictionStopped):
        predict_sliding_window(model, x, (8, 8, 8), 2, batch_size=1, should_stop=lambda: model.batches >= 5)
    assert model.batches == 5
