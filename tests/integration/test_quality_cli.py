"""Calibration and quality through the real CLI: find-best stores a temperature and a quality fit beside the
postprocessing; ``predict --uncertainty --save-probabilities`` writes ``quality.json`` (every case, its schema),
float uncertainty maps in the input geometry and calibrated probabilities."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, shrink_networks

pytestmark = pytest.mark.slow


def test_find_best_then_predict_writes_quality_and_uncertainty(tmp_path, hippocampus_subset, capsys):
    data = hippocampus_subset(6)
    held = hippocampus_subset(2, start=150)
    work = tmp_path / "work"
    assert (
        main(["plan", str(data), "-o", str(work), "--num-workers", "1", "--device", "cpu", "--configs", "3d_fullres"])
        == 0
    )
    shrink_networks(work)
    assert main(["train", str(work), "--fold", "0", *TINY_TRAIN]) == 0
    assert main(["find-best", str(work)]) == 0
    fit = json.loads((work / "postprocessing.json").read_text())
    temperature = fit["calibration"]["temperature"]
    assert 0.05 <= temperature <= 20 and fit["quality"]["source"] == "cross-validation"
    assert set(fit["quality"]["volumes"]) == {"1", "2"}  # from the fingerprint's label volumes

    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((held / "imagesTr").glob("*.nii.gz")):
        shutil.copy(src, images / src.name.replace(".nii.gz", "_0000.nii.gz"))
    out = tmp_path / "out"
    capsys.readouterr()
    predict = ["predict", "-i", str(images), "-o", str(out), "-m", str(work), "--device", "cpu"]
    assert main([*predict, "--uncertainty", "--save-probabilities"]) == 0
    assert "quality of 2 case(s)" in capsys.readouterr().out
    doc = json.loads((out / "quality.json").read_text())
    assert doc["format"] == "medseg-quality-v1" and doc["temperature"] == pytest.approx(temperature)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in images.iterdir())
    assert sorted(doc["cases"]) == cases
    for case in cases:
        entry = doc["cases"][case]
        assert entry["verdict"] in ("ok", "review") and isinstance(entry["reasons"], list)
        assert entry["warnings"] == [] and 0.0 <= entry["score"] <= 1.0
        assert entry["verdict"] == ("review" if entry["reasons"] else "ok")
        assert sorted(entry["labels"]) == ["1", "2"]
        for features in entry["labels"].values():
            assert {"voxels", "volume_ml", "components", "expected_dice", "uncertainty_inside"} <= set(features)
        source = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
        umap = sitk.ReadImage(str(out / entry["uncertainty"]))
        assert umap.GetPixelID() == sitk.sitkFloat32 and umap.GetSize() == source.GetSize()
        assert umap.GetSpacing() == source.GetSpacing() and umap.GetOrigin() == source.GetOrigin()
        assert umap.GetDirection() == source.GetDirection()
        values = sitk.GetArrayFromImage(umap)
        assert values.min() >= 0.0 and values.max() <= 1.0
        with np.load(out / f"{case}.npz") as f:
            probs = f["probabilities"].astype(np.float32)
        assert probs.shape[0] == 3 and np.allclose(probs.sum(0), 1.0, atol=5e-3)

    # a rerun skips both cases and keeps their entries
    assert main(predict) == 0
    assert sorted(json.loads((out / "quality.json").read_text())["cases"]) == cases
