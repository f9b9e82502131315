"""`medseg train` options reach the TrainConfig that training receives."""

from __future__ import annotations

import pytest

import medseg.training
from medseg.cli.main import main


@pytest.mark.parametrize("flag, expected", [(None, None), ("auto", None), ("on", True), ("off", False)])
def test_intensity_augmentation_flag(tmp_path, monkeypatch, capsys, flag, expected):
    seen = []

    def fake_train(work, cfg, resume=False):
        seen.append(cfg)
        return work / "runs"

    monkeypatch.setattr(medseg.training, "train", fake_train)
    args = ["train", str(tmp_path), "--fold", "1", "--time-budget", "5"]
    if flag is not None:
        args += ["--intensity-augmentation", flag]
    assert main(args) == 0
    (cfg,) = seen
    assert cfg.augmentation.intensity is expected  # None: resolved by the schedule inside train()
    assert cfg.time_budget_minutes == 5 and cfg.fold == 1
    if expected is None:
        assert cfg.resolved().augmentation.intensity is False


def test_intensity_augmentation_rejects_other_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", str(tmp_path), "--intensity-augmentation", "maybe"])
    assert info.value.code == 2
    assert "--intensity-augmentation" in capsys.readouterr().err


def test_pretrained_flag_reaches_the_train_config(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(medseg.training, "train", lambda work, cfg, resume=False: seen.append(cfg) or work)
    assert main(["train", str(tmp_path), "--pretrained", "model.zip"]) == 0
    assert main(["train", str(tmp_path)]) == 0
    assert [c.pretrained for c in seen] == ["model.zip", None]


def test_snapshot_and_lookahead_flags_reach_the_train_config(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(medseg.training, "train", lambda work, cfg, resume=False: seen.append(cfg) or work)
    assert main(["train", str(tmp_path), "--snapshots", "4", "--optimizer", "lookahead-sgd", "--lookahead-k", "6"]) == 0
    assert main(["train", str(tmp_path), "--snapshots", "3", "--cycle-growth", "2", "--lookahead-alpha", "0.8"]) == 0
    assert main(["train", str(tmp_path)]) == 0
    first, second, plain = seen
    assert (first.lr_schedule, first.cosine_cycles, first.cosine_cycle_growth, first.snapshots) == (
        "cosine_restarts",
        4,
        1.0,
        True,
    )
    assert (first.optimizer, first.lookahead_k, first.lookahead_alpha) == ("lookahead-sgd", 6, 0.5)
    assert (second.cosine_cycles, second.cosine_cycle_growth, second.lookahead_alpha) == (3, 2.0, 0.8)
    assert (plain.lr_schedule, plain.snapshots, plain.optimizer) == ("poly", False, "auto")
    assert main(["train", str(tmp_path), "--cycle-growth", "2"]) == 2
    assert "--cycle-growth needs --snapshots" in capsys.readouterr().err
