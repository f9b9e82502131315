"""The progress-based EMA of weights (``--weight-averaging ema``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medseg.training import TrainConfig
from medseg.training.weight_averaging import WeightAverage


def _model(value: float) -> nn.Module:
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(value)
        m.bias.fill_(value)
    return m


def _set(m: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)


def test_nothing_before_start_then_a_copy():
    m = _model(1.0)
    wa = WeightAverage(m, start=0.5, horizon=0.1)
    wa.update(0.2)
    assert not wa.active
    wa.copy_to_model()  # no-op before the start
    assert torch.all(m.weight == 1.0)
    _set(m, 3.0)
    wa.update(0.5)
    assert wa.active and wa.updates == 1
    _set(m, 0.0)
    wa.copy_to_model()
    assert torch.all(m.weight == 3.0) and torch.all(m.bias == 3.0)


def test_decay_follows_progress_not_steps():
    m = _model(0.0)
    wa = WeightAverage(m, start=0.0, horizon=0.1)
    wa.update(0.0)  # average = 0
    _set(m, 1.0)
    wa.update(0.1)  # one horizon later: the old average keeps weight 1/e
    expected = 1.0 - math.exp(-1.0)
    assert wa.shadow is not None
    assert wa.shadow[0][0, 0].item() == pytest.approx(expected, rel=1e-6)
    # ten small steps over the same progress give the same weight as one big one
    m2 = _model(0.0)
    wa2 = WeightAverage(m2, start=0.0, horizon=0.1)
    wa2.update(0.0)
    _set(m2, 1.0)
    for i in range(1, 11):
        wa2.update(0.01 * i)
    assert wa2.shadow[0][0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_state_round_trip_and_mismatch():
    m = _model(2.0)
    wa = WeightAverage(m, start=0.0)
    wa.update(0.3)
    state = wa.state_dict()
    other = WeightAverage(_model(5.0), start=0.0)
    other.load_state_dict(state)
    assert other.updates == 1 and other.last_progress == 0.3
    other.copy_to_model()
    assert torch.all(other.model.weight == 2.0)
    with pytest.raises(ValueError, match="other parameters"):
        WeightAverage(nn.Linear(3, 1, bias=False)).load_state_dict(state)


def test_config_checks_the_choice():
    assert TrainConfig(weight_averaging="ema").check() == []
    assert any("weight_averaging" in p for p in TrainConfig(weight_averaging="swa").check())


def test_auto_means_ema_in_a_time_budget_and_off_in_an_epoch_schedule():
    assert TrainConfig().weight_averaging == "auto" and TrainConfig().check() == []
    assert TrainConfig(time_budget_minutes=30).resolved().weight_averaging == "ema"
    assert TrainConfig(epochs=1000).resolved().weight_averaging == "off"  # nnU-Net's path: the last weights
    assert TrainConfig(time_budget_minutes=30, weight_averaging="off").resolved().weight_averaging == "off"
    assert TrainConfig(epochs=10, weight_averaging="ema").resolved().weight_averaging == "ema"
