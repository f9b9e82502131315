"""scripts/bench_arms.py: an arm reused from an earlier run is scored, not retrained (subprocesses faked)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import load_script


def _trained_work(root: Path, iteration: int, elapsed: float, fold_dice: float) -> Path:
    run = root / "runs" / "3d_fullres" / "unet" / "fold_0"
    (run / "validation").mkdir(parents=True)
    (root / "plans.json").write_text("{}")
    history = [{"iteration": iteration // 2}, {"iteration": iteration}]
    (run / "progress.json").write_text(json.dumps({"elapsed_seconds": elapsed, "history": history}))
    (run / "validation" / "metrics.json").write_text(json.dumps({"mean_foreground_dice": fold_dice}))
    return root


def _fake_medseg(calls: list[list[str]]):
    def run(cmd: list[str], check: bool = False, **_: object) -> subprocess.CompletedProcess[bytes]:
        args = cmd[3:]  # python -m medseg ...
        calls.append(args)
        if args[0] == "evaluate":
            metrics = {
                "foreground_mean": {"dice": 0.8, "hd95": 2.0},
                "mean": {"1": {"dice": 0.8}},
                "cases": [{"case": "c1", "labels": {"1": {"dice": 0.8}}}],
            }
            Path(args[args.index("-o") + 1]).write_text(json.dumps(metrics))
        return subprocess.CompletedProcess(cmd, 0)

    return run


def test_a_reused_arm_is_copied_scored_and_never_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_script("bench_arms")
    trained = _trained_work(tmp_path / "earlier", iteration=3016, elapsed=1743.2, fold_dice=0.893)
    before = sorted(p.relative_to(trained) for p in trained.rglob("*"))
    calls: list[list[str]] = []
    monkeypatch.setattr(module.subprocess, "run", _fake_medseg(calls))

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a reused arm must not be trained")

    monkeypatch.setattr(module.subprocess, "Popen", no_training)
    out = tmp_path / "out"
    argv = [str(trained), str(tmp_path / "imgs"), str(tmp_path / "labels"), "-o", str(out), "--fold", "0"]
    assert module.main([*argv, "--find-best", "--reuse", f"plain={trained}"]) == 0

    (row,) = json.loads((out / "arms.json").read_text())
    assert row["arm"] == "plain"
    assert row["train_s"] == 1743.2 and row["iterations"] == 3016 and row["fold_dice"] == 0.893
    assert row["dice"] == 0.8
    assert row["train_args"] == [] and row["reused_from"] == str(trained)
    assert [c[0] for c in calls] == ["find-best", "predict", "evaluate"]
    assert calls[0][1] == str(out / "work_plain")  # the copy, never the earlier run's folder
    assert (out / "work_plain" / "runs" / "3d_fullres" / "unet" / "fold_0" / "progress.json").is_file()
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before


def test_no_arm_at_all_is_refused(tmp_path: Path) -> None:
    module = load_script("bench_arms")
    with pytest.raises(SystemExit) as info:
        module.main([str(tmp_path), str(tmp_path), str(tmp_path), "-o", str(tmp_path / "out")])
    assert info.value.code == 2


def test_a_reused_folder_without_the_fold_fails_with_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_script("bench_arms")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(module.subprocess, "run", _fake_medseg([]))
    argv = [str(tmp_path), str(tmp_path), str(tmp_path), "-o", str(tmp_path / "out"), "--fold", "0"]
    with pytest.raises(SystemExit, match="no runs/\\*/\\*/fold_0/progress.json"):
        module.main([*argv, "--reuse", f"plain={tmp_path / 'empty'}"])
