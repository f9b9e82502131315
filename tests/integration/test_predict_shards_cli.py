"""``medseg predict`` split among processes through the real CLI: ``--part K/N`` commands and two ``torchrun``
ranks (gloo, CPU) write the same segmentations as one plain run, merge their folder records, and a rerun skips
the finished cases."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, shrink_networks

pytestmark = pytest.mark.slow


def _segmentations(folder: Path) -> dict[str, np.ndarray]:
    return {
        p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        for p in sorted(folder.glob("*.nii.gz"))
        if not p.name.endswith("_instances.nii.gz")
    }


def _assert_same(a: Path, b: Path) -> None:
    left, right = _segmentations(a), _segmentations(b)
    assert sorted(left) == sorted(right) and left
    for name, seg in left.items():
        np.testing.assert_array_equal(seg, right[name], err_msg=name)


def test_parts_and_torchrun_ranks_match_one_run(tmp_path, synthetic_dataset, capsys, monkeypatch):
    work = tmp_path / "work"
    plan = ["plan", str(synthetic_dataset), "-o", str(work), "--num-workers", "1", "--device", "cpu"]
    assert main([*plan, "--configs", "3d_fullres"]) == 0
    shrink_networks(work)
    assert main(["train", str(work), "--fold", "0", *TINY_TRAIN, "--no-validation"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))[:4]:
        shutil.copy(src, images / src.name)
    predict = ["predict", "-i", str(images), "-m", str(work), "--device", "cpu", "--no-tta", "-q"]

    whole = tmp_path / "whole"
    assert main([*predict, "-o", str(whole)]) == 0

    split = tmp_path / "split"
    assert main([*predict, "-o", str(split), "--part", "1/2", "--statistics"]) == 0
    assert main([*predict, "-o", str(split), "--part", "2/2", "--statistics"]) == 0
    assert not (split / "statistics.json").exists()  # each part wrote only its own statistics part
    assert len(list(split.glob("statistics.part-*-of-2.json"))) == 2
    _assert_same(whole, split)
    parts = sorted(p.name for p in split.glob("prediction_record.part-*"))
    assert parts == ["prediction_record.part-1-of-2.json", "prediction_record.part-2-of-2.json"]
    capsys.readouterr()
    assert main([*predict, "-o", str(split), "--statistics"]) == 0  # after the parts: nothing to do but merge
    assert "predicted 0 case(s)" in capsys.readouterr().out and not list(split.glob("*.part-*"))
    assert len(json.loads((split / "prediction_record.json").read_text())["cases"]) == 4
    statistics = json.loads((split / "statistics.json").read_text())["cases"]
    assert len(statistics) == 4 and {e["source"] for e in statistics.values()} == {"predicted"}
    rows = (split / "statistics.csv").read_text().splitlines()[1:]
    assert {r.split(",")[0] for r in rows} == set(statistics)

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*predict, "-o", str(split), "--part", "1/2"]) == 2  # torchrun's ranks split already
    monkeypatch.delenv("WORLD_SIZE")

    ranks = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "medseg"]
    command += [*predict, "-o", str(ranks), "--instances", "--statistics"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same(whole, ranks)
    assert "(part 1 of 2)" in proc.stdout and "(part 2 of 2)" in proc.stdout
    assert not list(ranks.glob("*.part-*"))  # rank 0 merged the parts after the barrier
    assert len(json.loads((ranks / "prediction_record.json").read_text())["cases"]) == 4
    assert len(json.loads((ranks / "instances.json").read_text())["cases"]) == 4
    assert len(json.loads((ranks / "statistics.json").read_text())["cases"]) == 4

    stamps = {p.name: p.stat().st_mtime_ns for p in ranks.glob("*.nii.gz")}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("predicted 0 case(s)") == 2 and "skipped" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in ranks.glob("*.nii.gz")} == stamps
