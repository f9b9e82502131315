"""`medseg predict --statistics --preview` (with --instances) hand predict_folder one hook that feeds every writer,
names labels from the model's plan, and reports skipped cases from their existing segmentations."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

import medseg.ensembling
import medseg.inference
from medseg.cli.main import main
from medseg.inference import PredictionResult
from medseg.inference.case_output import FinishedCase
from medseg.io.image import ImageGeometry, write_image
from tests.unit.inference.conftest import build_plan

GEOMETRY = ImageGeometry((6, 10, 8), (2.5, 0.9, 0.9), (1.0, 2.0, 3.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def test_report_flags_feed_every_writer_and_skipped_cases_are_reported(tmp_path, monkeypatch, capsys):
    plan = build_plan(label_ids=(0, 1, 2))  # label names l0, l1, l2
    monkeypatch.setattr(medseg.ensembling, "work_dir_predictor", lambda *a, **k: SimpleNamespace(plan=plan))
    images, out = tmp_path / "in", tmp_path / "out"
    labels = np.zeros(GEOMETRY.shape, np.uint8)
    labels[1:4, 2:6, 2:6] = 2
    for case in ("a", "b"):
        write_image(np.arange(480, dtype=np.int16).reshape(GEOMETRY.shape), GEOMETRY, images / f"{case}.nii.gz")
    write_image(labels, GEOMETRY, out / "b.nii.gz")  # predicted by an earlier run

    def predict_folder(inp, output, predictor, case_hook=None, **kwargs):
        seg = output / "a.nii.gz"
        case_hook(FinishedCase("a", labels, GEOMETRY, plan.label_ids, None, seg, inp / "a.nii.gz"))
        write_image(labels, GEOMETRY, seg)
        return PredictionResult(output, written=["a"], skipped=["b"])

    monkeypatch.setattr(medseg.inference, "predict_folder", predict_folder)
    base = ["predict", "-i", str(images), "-o", str(out), "-m", str(tmp_path), "--device", "cpu"]
    assert main([*base, "--statistics", "--preview", "--instances"]) == 0
    printed = capsys.readouterr().out
    assert "1 skipped case(s) reported from their existing segmentations" in printed
    assert f"previews of 2 case(s) written to {out / 'previews'}" in printed
    doc = json.loads((out / "statistics.json").read_text())
    assert {c: e["source"] for c, e in doc["cases"].items()} == {"a": "predicted", "b": "existing segmentation"}
    for entry in doc["cases"].values():
        assert [(s["label"], s["name"], s["voxels"]) for s in entry["structures"]] == [(1, "l1", 0), (2, "l2", 48)]
    assert (out / "previews" / "a.png").is_file() and (out / "previews" / "b.png").is_file()
    assert "a" in json.loads((out / "instances.json").read_text())["cases"]

    # a skipped case whose segmentation cannot be read: named, the exit status says so
    (out / "statistics.json").unlink()
    (out / "b.nii.gz").write_bytes(b"garbage")
    assert main([*base, "--statistics"]) == 1
    assert "b: not reported:" in capsys.readouterr().out
