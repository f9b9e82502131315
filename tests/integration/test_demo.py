"""`medseg demo`: the embedded default runs the whole pipeline on data it generates itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main

pytestmark = pytest.mark.slow


def test_demo_runs_whole_pipeline_through_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--minutes", "0.4", "--num-cases", "6", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "mean foreground Dice" in printed

    # a budget plan that records why it chose its network
    plan = json.loads((out / "work" / "plans.json").read_text())
    assert plan["time_budget_minutes"] == pytest.approx(0.4)
    assert plan["notes"]["budget"]["chosen"]["iterations"] > 0

    # every unseen test case predicted in the input's exact geometry, with declared label ids only
    images = sorted((out / "test" / "imagesTr").glob("*.nii.gz"))
    preds = sorted((out / "predictions").glob("*.nii.gz"))
    assert len(images) == 3 and [p.name for p in preds] == [p.name for p in images]
    for img_path, pred_path in zip(images, preds):
        img, pred = sitk.ReadImage(str(img_path)), sitk.ReadImage(str(pred_path))
        assert pred.GetSize() == img.GetSize()
        assert pred.GetOrigin() == img.GetOrigin()
        assert pred.GetSpacing() == img.GetSpacing()
        assert pred.GetDirection() == img.GetDirection()
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2, 3}

    # the printed Dice is the one in the metrics file
    metrics = json.loads((out / "metrics.json").read_text())
    printed_dice = float(printed.split("mean foreground Dice on unseen test cases ")[1].split()[0])
    assert 0.0 <= printed_dice <= 1.0
    assert printed_dice == pytest.approx(metrics["foreground_mean"]["dice"], abs=5e-4)
    overlay = out / "overlay.png"
    assert overlay.is_file() and overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
