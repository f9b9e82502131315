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
