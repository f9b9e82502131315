"""scripts/compare_metrics.py: paired per-case differences of `medseg evaluate` results against a base."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medseg.evaluation.evaluate import evaluate_folders
from medseg.io.image import ImageGeometry, write_image
from tests.helpers import load_script

cm = load_script("compare_metrics")


def _result(per_case: dict[str, tuple[float | None, ...]], metric: str = "dice") -> dict[str, Any]:
    return {
        "cases": [
            {"case": c, "labels": {str(i + 1): {metric: v} for i, v in enumerate(values)}}
            for c, values in per_case.items()
        ]
    }


def test_paired_differences_by_hand() -> None:
    base = _result({"a": (0.8, 0.6), "b": (0.9, 0.9), "c": (0.5, 0.7)})  # case means 0.7, 0.9, 0.6
    model = _result({"a": (0.9, 0.7), "b": (0.9, 0.9), "c": (0.4, 0.6), "d": (1.0, 1.0)})  # 0.8, 0.9, 0.5 (+ d)
    rows = cm.compare([("base", base), ("model", model)], "dice")
    assert rows[0] == {"name": "base", "n": 3, "mean": pytest.approx(2.2 / 3)}
    r = rows[1]
    # differences +0.1, 0, -0.1 over the 3 common cases (d has no base): mean 0, sd 0.1, SE 0.1 / sqrt 3
    assert r["n"] == 3 and r["mean"] == pytest.approx(2.2 / 3)
    assert r["delta"] == pytest.approx(0.0, abs=1e-12)
    assert r["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert (r["better"], r["worse"], r["tied"]) == (1, 1, 1)


def test_lower_is_better_for_hd95_and_null_labels_are_left_out() -> None:
    base = _result({"a": (2.0, None), "b": (4.0, 4.0)}, "hd95")
    model = _result({"a": (1.0, 3.0), "b": (5.0, 5.0)}, "hd95")  # a: 2.0 vs 2.0 (null left out), b: 5 vs 4
    r = cm.compare([("base", base), ("model", model)], "hd95")[1]
    assert r["delta"] == pytest.approx(0.5)
    assert (r["better"], r["worse"], r["tied"]) == (0, 1, 1)


def test_results_with_no_common_case_are_an_error() -> None:
    with pytest.raises(ValueError, match="no case"):
        cm.compare([("base", _result({"a": (0.5,)})), ("model", _result({"b": (0.5,)}))], "dice")


def test_cli_reads_real_evaluate_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    geo = ImageGeometry(
        shape=(4, 6, 6), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel())
    )
    ref = np.zeros((4, 6, 6), np.uint8)
    ref[1:3, 1:5, 1:5] = 1
    worse = ref.copy()
    worse[1, 1:5, 1:5] = 0  # half of the object missed in case x
    for folder, maps in (("ref", (ref, ref)), ("base", (ref, ref)), ("model", (worse, ref))):
        for case, arr in zip(("x", "y"), maps):
            write_image(arr, geo, tmp_path / folder / f"{case}.nii.gz")
    for name in ("base", "model"):
        evaluate_folders(
            tmp_path / name, tmp_path / "ref", output=tmp_path / f"{name}.json", num_workers=0, progress=False
        )
    out = tmp_path / "rows.json"
    code = cm.main([f"base={tmp_path / 'base.json'}", f"model={tmp_path / 'model.json'}", "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert rows[1]["delta"] == pytest.approx((2 / 3 - 1.0) / 2)  # case x Dice 2*16/(32+16) = 2/3, case y 1
    assert (rows[1]["better"], rows[1]["worse"], rows[1]["tied"]) == (0, 1, 1)
    assert "| model | 2 |" in capsys.readouterr().out


def test_cli_names_a_file_that_is_not_an_evaluate_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mean": {}}))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_result({"a": (0.5,)})))
    assert cm.main([f"base={good}", f"other={bad}"]) == 2
    assert str(bad) in capsys.readouterr().err
