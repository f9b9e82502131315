"""``medseg predict --max-ram`` through the real CLI: a budget far below the case's memory plan streams it
(recorded in prediction_record.json), with the same segmentation as an unconstrained run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, shrink_networks

pytestmark = pytest.mark.slow


def test_a_tiny_ram_budget_streams_with_the_same_segmentation(tmp_path, synthetic_dataset):
    work = tmp_path / "work"
    plan = ["plan", str(synthetic_dataset), "-o", str(work), "--num-workers", "1", "--device", "cpu"]
    assert main([*plan, "--configs", "3d_fullres"]) == 0
    shrink_networks(work)
    assert main(["train", str(work), "--fold", "0", *TINY_TRAIN, "--no-validation"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    source = sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))[0]
    shutil.copy(source, images / source.name)
    outputs = {}
    for budget in ("0.001", "none"):
        out = outputs[budget] = tmp_path / f"out_{budget}"
        args = ["predict", "-i", str(images), "-o", str(out), "-m", str(work), "--device", "cpu", "--max-ram", budget]
        assert main([*args, "--time-budget-per-case", "none"]) == 0
    case = source.name[: -len(".nii.gz")]
    tight = json.loads((outputs["0.001"] / "prediction_record.json").read_text())["cases"][case]["memory"]
    free = json.loads((outputs["none"] / "prediction_record.json").read_text())["cases"][case]["memory"]
    assert tight["streamed"] is True and tight["budget_gb"] == 0.001 and tight["fits"] is False
    assert free["streamed"] is False and free["budget_gb"] is None
    assert tight["estimated_peak_gb"] == free["estimated_peak_gb"] > 0
    a, b = (sitk.ReadImage(str(outputs[k] / source.name)) for k in ("0.001", "none"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert sorted(p.name for p in outputs["0.001"].iterdir()) == sorted(p.name for p in outputs["none"].iterdir())
