"""scripts/bench_postprocessing_prior.py: Dice / HD95 with and without the rules decided from the labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.fingerprint import CaseFingerprint, Fingerprint
from tests.helpers import load_script


def _write(path: Path, array: np.ndarray) -> None:
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing((1.0, 1.0, 3.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def test_rule_removes_a_far_blob_and_the_table_shows_it(tmp_path, capsys):
    cases = tuple(
        CaseFingerprint(f"c{i}", (3.0, 1.0, 1.0), (10, 30, 30), (10, 30, 30), 1.0, {1: 200}, {1: (200,)})
        for i in range(12)
    )
    (tmp_path / "work").mkdir()
    Fingerprint("t", ("mr",), (0, 1), cases, ()).save(tmp_path / "work" / "fingerprint.json")
    for case in ("a", "b"):
        ref = np.zeros((10, 30, 30), np.uint8)
        ref[2:6, 5:15, 5:15] = 1
        pred = ref.copy()
        pred[8, 25:28, 25:28] = 1  # a stray blob ~20 voxels away
        _write(tmp_path / "labels" / f"{case}.nii.gz", ref)
        _write(tmp_path / "pred" / f"{case}.nii.gz", pred)
    out = tmp_path / "summary.json"
    assert (
        load_script("bench_postprocessing_prior").main(
            [
                str(tmp_path / "pred"),
                str(tmp_path / "labels"),
                str(tmp_path / "work"),
                "--num-workers",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads(out.read_text())
    assert summary["rules"] == {"1": [{"op": "largest_component"}]} and summary["num_cases"] == 2
    none, decided = summary["variants"]["none"]["1"], summary["variants"]["decided"]["1"]
    assert decided["dice"] == 1.0 and none["dice"] < 1.0
    assert decided["hd95_max"] == 0.0
    assert "label 1: largest_component" in capsys.readouterr().out
