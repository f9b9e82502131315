"""scripts/bench_techniques.py: the issue-37 table assembled from fake bench_arms.py folders (no training)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.ensembling.runs import find_validation_predictions
from medseg.inference.export import write_probabilities
from medseg.io.workdir import WorkDir
from tests.helpers import load_script


def _labels(shift: int) -> np.ndarray:
    ref = np.zeros((6, 8, 8), np.uint8)
    ref[1:4, 2 + shift : 5 + shift, 2:5] = 1
    ref[1:4, 2:5, 5:7] = 2
    return ref


def _onehot(labels: np.ndarray, k: int = 3, p: float = 0.9) -> np.ndarray:
    probs = np.full((k, *labels.shape), (1 - p) / (k - 1), np.float32)
    for c in range(k):
        probs[c][labels == c] = p
    return probs


def _arms_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    arms, labels, out = tmp_path / "armsA", tmp_path / "test_labels", tmp_path / "out"
    rows = [
        {"arm": "plain", "train_args": [], "iterations": 600, "train_s": 1800.0, "predict_s": 12.0, "dice": 0.8900,
         "hd95": 1.3, "fold_dice": 0.8850},
        {"arm": "lookahead", "train_args": ["--optimizer", "lookahead-adamw"], "iterations": 590, "train_s": 1800.0,
         "predict_s": 12.5, "dice": 0.8930, "hd95": 1.2, "fold_dice": None},
    ]  # fmt: skip
    arms.mkdir()
    (arms / "arms.json").write_text(json.dumps(rows))
    (arms / "metrics_plain.json").write_text(json.dumps({"label_ids": [1, 2]}))
    for row in rows:
        WorkDir(arms / f"work_{row['arm']}").run("3d_fullres", "unet", 0).path.mkdir(parents=True)
    run = WorkDir(arms / "work_lookahead").run("3d_fullres", "unet", 0)
    run.validation.mkdir()
    run.validation_metrics.write_text(json.dumps({"mean_foreground_dice": 0.8870}))  # read when arms.json lacks it
    labels.mkdir()
    for case in ("c1", "c2"):
        sitk.WriteImage(sitk.GetImageFromArray(_labels(0)), str(labels / f"{case}.nii.gz"))
    # cached held-out probabilities: plain perfect, lookahead shifted by one voxel in label 1
    for arm, shift in (("plain", 0), ("lookahead", 1)):
        folder = out / "armsA" / f"probs_{arm}"
        folder.mkdir(parents=True)
        for case in ("c1", "c2"):
            write_probabilities(folder / f"{case}.npz", _onehot(_labels(shift)), [0, 1, 2])
        (out / "armsA" / f"probs_{arm}.json").write_text(json.dumps({"seconds": [4.0], "commands": []}))
    return arms, labels, out


def test_dry_run_assembles_the_table_from_cached_results_and_runs_nothing(tmp_path, monkeypatch, capsys):
    bench = load_script("bench_techniques")
    arms, labels, out = _arms_folder(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError(f"dry run ran {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    assert bench.main([str(arms), "--test-images", str(tmp_path / "imgs"), "--test-labels", str(labels), "-o",
                       str(out), "--dry-run", "--plan-work", "/plan/work"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    rows = {line.split(" | ")[1]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    plain, look = rows["plain (no train options)"], rows["lookahead"]
    assert plain[6] == "1.0000"  # raw held-out Dice of the perfect probabilities
    raw_look = float(look[6])
    assert 0.5 < raw_look < 1.0  # label 1 shifted by a voxel
    assert look[10] == "+0.0030" and "needs a second seed" in look[11]  # 0.8930 - 0.8900 < 0.005
    assert look[4] == "0.8870"  # the run's validation summary
    assert look[9] == "1812"  # total compute: training + prediction seconds
    assert rows["all 2 arms, rule mean"][5:7] == ["-", "-"]  # not fitted in a dry run
    assert "would run:" in text and "find-best" in text and "--try-crf" in text
    distill = next(line for line in text.splitlines() if "--distill-from" in line)
    for arm in ("plain", "lookahead"):
        assert str(WorkDir(arms / f"work_{arm}").run("3d_fullres", "unet", 0).path) in distill
    assert "/plan/work" in distill
    assert not (out / "techniques.json").exists()  # a dry run writes nothing


def test_a_reused_arm_names_where_it_was_trained_instead_of_a_train_command(tmp_path):
    bench = load_script("bench_techniques")
    reused = {"arm": "plain", "train_args": [], "reused_from": "/earlier/work30"}
    text = bench.train_command(reused, tmp_path / "work_plain", "0")
    assert "/earlier/work30" in text and "medseg" not in text
    trained = {"arm": "look", "train_args": ["--optimizer", "lookahead-adamw"]}
    line = bench.train_command(trained, tmp_path / "work_look", "0")
    assert "train" in line and str(tmp_path / "work_look") in line and line.endswith("--optimizer lookahead-adamw")


def test_rules_weigh_the_member_that_is_right():
    table = load_script("technique_table")
    right = [_onehot(_labels(0), p=0.8) for _ in range(4)]
    wrong = [_onehot(np.zeros((6, 8, 8), np.uint8), p=0.95) for _ in range(4)]  # confidently all background
    cases = [(np.stack([r, w]), _labels(0).astype(np.int64)) for r, w in zip(right, wrong)]
    scores = table.rule_scores(cases, cases[:2])
    assert scores["heldout"]["mean"] == 0.0  # 0.8/0.1 vs 0.05/0.95: background wins the mean
    assert scores["heldout"]["weighted"] == pytest.approx(1.0)
    assert scores["heldout"]["vote"] == 0.0  # one vote each: the higher mean probability (background) wins
    assert scores["heldout"]["stacking"] > 0.5  # learns to trust the right member's log-odds
    assert scores["cv"]["weighted"] == pytest.approx(1.0)  # cross-fitted on the other half
    assert scores["weights"][0] > 0.9


def test_cross_work_makes_each_arm_a_find_best_member(tmp_path):
    table = load_script("technique_table")
    arms = {}
    for arm in ("plain", "snapshots"):
        work = tmp_path / f"work_{arm}"
        (work).mkdir()
        WorkDir(work).plans.write_text("{}")
        validation = WorkDir(work).run("3d_fullres", "unet", 0).validation
        validation.mkdir(parents=True)
        write_probabilities(validation / "c1.npz", _onehot(_labels(0)), [0, 1, 2])
        arms[arm] = work
    table.build_cross_work(arms, 0, tmp_path / "cross")
    found = find_validation_predictions(tmp_path / "cross")
    assert sorted(found) == [("plain", "unet"), ("snapshots", "unet")]
    assert WorkDir(tmp_path / "cross").plans.read_text() == "{}"
