"""TrainConfig: JSON round trip, validation messages, schedules."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medseg.errors import ConfigError
from medseg.training.config import AugmentationConfig, TrainConfig
from medseg.training.schedule import completed_cycles, cosine_restarts_factor, cycle_ends, lr_factor, poly_factor


def test_round_trip_through_json(tmp_path):
    cfg = TrainConfig(
        fold="all",
        epochs=7,
        class_weights=(1.0, 2.0, 3.0),
        time_budget_minutes=2.5,
        augmentation=AugmentationConfig(p_elastic=0.3, mirror_axes=(1, 2), scale_range=(0.8, 1.2)),
    )
    text = cfg.to_json()
    assert isinstance(json.loads(text)["augmentation"]["scale_range"], list)
    (tmp_path / "config.json").write_text(text)
    back = TrainConfig.load(tmp_path / "config.json")
    assert back == cfg
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_unknown_keys_and_bad_values_are_reported_together():
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig.from_dict({"epochz": 3})
    bad = TrainConfig(
        optimizer="adam", precision="fp8", foreground_oversample=2.0, augmentation=AugmentationConfig(p_scale=1.5)
    )
    with pytest.raises(ConfigError) as info:
        bad.validate()
    msg = str(info.value)
    for part in ("optimizer", "precision", "foreground_oversample", "augmentation.p_scale"):
        assert part in msg


def test_effective_lr_depends_on_optimizer():
    assert TrainConfig().effective_lr == 1e-2
    assert TrainConfig(optimizer="adamw").effective_lr == 1e-3
    assert dataclasses.replace(TrainConfig(), lr=0.5).effective_lr == 0.5


def test_auto_optimizer_depends_on_the_schedule():
    long = TrainConfig().resolved()
    assert (long.optimizer, long.lr, long.momentum) == ("sgd", 1e-2, 0.99)
    short = TrainConfig(time_budget_minutes=30).resolved()
    assert (short.optimizer, short.lr) == ("adamw", 3e-3)
    assert short.resolved() == short  # idempotent: a stored configuration resolves to itself
    sgd_short = TrainConfig(time_budget_minutes=30, optimizer="sgd").resolved()
    assert (sgd_short.lr, sgd_short.momentum) == (3e-2, 0.9)
    explicit = TrainConfig(time_budget_minutes=30, optimizer="sgd", lr=0.2, momentum=0.5).resolved()
    assert (explicit.lr, explicit.momentum) == (0.2, 0.5)
    with pytest.raises(ConfigError, match="momentum"):
        TrainConfig(momentum=1.0).validate()


def test_intensity_augmentation_depends_on_the_schedule():
    assert TrainConfig().resolved().augmentation.intensity is True
    short = TrainConfig(time_budget_minutes=30).resolved()
    assert short.augmentation.intensity is False
    assert short.augmentation.p_gamma == AugmentationConfig().p_gamma  # the probabilities are kept as set
    assert short.resolved() == short
    forced = TrainConfig(time_budget_minutes=30, augmentation=AugmentationConfig(intensity=True)).resolved()
    assert forced.augmentation.intensity is True
    # the training data's choice (medseg.training.intensity_rule) applies to a short schedule left unset ...
    assert TrainConfig(time_budget_minutes=30).resolved(short_schedule_intensity=True).augmentation.intensity is True
    # ... never over the user's setting, nor to an epoch-based run
    off = TrainConfig(time_budget_minutes=30, augmentation=AugmentationConfig(intensity=False))
    assert off.resolved(short_schedule_intensity=True).augmentation.intensity is False
    assert TrainConfig().resolved(short_schedule_intensity=False).augmentation.intensity is True
    assert TrainConfig(augmentation=AugmentationConfig(intensity=False)).resolved().augmentation.intensity is False
    # a config.json written before the field existed loads, and resolves by its schedule
    d = TrainConfig(time_budget_minutes=5).to_dict()
    del d["augmentation"]["intensity"]
    assert TrainConfig.from_dict(d).resolved().augmentation.intensity is False


def test_schedules():
    assert poly_factor(0.0) == 1.0
    assert poly_factor(1.0) == 0.0
    assert poly_factor(0.5, 0.9) == pytest.approx(0.5**0.9)
    # 3 cycles of lengths 1, 2, 4 (sevenths): restarts at 1/7 and 3/7, zero at the very end
    assert cosine_restarts_factor(0.0) == 1.0
    assert cosine_restarts_factor(0.5 / 7) == pytest.approx(0.5)
    assert cosine_restarts_factor(1 / 7) == pytest.approx(1.0)
    assert cosine_restarts_factor(2 / 7) == pytest.approx(0.5)
    assert cosine_restarts_factor(3 / 7) == pytest.approx(1.0)
    assert cosine_restarts_factor(1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine_restarts", 5 / 7, cosine_cycles=3) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        lr_factor("step", 0.1)


def test_warm_restarts_happen_at_the_right_iterations():
    total = 30  # an epoch-based run: progress = iteration / total
    for growth, restarts in ((1.0, [10, 20]), (2.0, [30 * 1 // 7 + 1, 30 * 3 // 7 + 1])):
        factors = [lr_factor("cosine_restarts", i / total, cosine_cycles=3, cycle_growth=growth) for i in range(total)]
        found = [i for i in range(1, total) if factors[i] > factors[i - 1]]
        assert found == restarts, growth
        assert factors[0] == 1.0 and all(factors[i] > 0.95 for i in restarts)  # a restart starts near lr0
        assert min(factors[r - 1] for r in restarts) < 0.05  # annealed before each restart
    assert [lr_factor("cosine_restarts", i / 30, cosine_cycles=3, cycle_growth=1.0) for i in (10, 20)] == [1.0, 1.0]
    assert cycle_ends(3, 1.0) == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert cycle_ends(4, 2.0) == pytest.approx([1 / 15, 3 / 15, 7 / 15, 1.0])
    assert [completed_cycles(i / 9, 3, 1.0) for i in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]


def test_snapshots_and_lookahead_settings_are_checked():
    with pytest.raises(ConfigError, match="snapshots need lr_schedule 'cosine_restarts'"):
        TrainConfig(snapshots=True).validate()
    with pytest.raises(ConfigError) as info:
        TrainConfig(cosine_cycles=0, lookahead_alpha=0.0).validate()
    assert "cosine_cycles" in str(info.value) and "lookahead_alpha" in str(info.value)
    cfg = TrainConfig(optimizer="lookahead-adamw", lr_schedule="cosine_restarts", snapshots=True, cosine_cycles=4)
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg.validate()
    assert cfg.resolved().lr == 1e-3  # the inner AdamW's epoch-based default
