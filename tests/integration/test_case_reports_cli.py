"""``medseg predict --statistics --preview`` through the real CLI on a tiny trained model: statistics.json and
statistics.csv list every case and every label of the model, one preview PNG per case; a rerun on more cases
keeps the earlier rows and predicts only the new case."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from medseg.cli.main import main
from medseg.postprocessing.preview import preview_size_px
from tests.helpers import TINY_TRAIN, shrink_networks

pytestmark = pytest.mark.slow


def test_predict_statistics_and_previews(tmp_path, synthetic_dataset, capsys):
    work = tmp_path / "work"
    plan = ["plan", str(synthetic_dataset), "-o", str(work), "--num-workers", "1", "--device", "cpu"]
    assert main([*plan, "--configs", "3d_fullres"]) == 0
    shrink_networks(work)
    assert main(["train", str(work), "--fold", "0", *TINY_TRAIN, "--no-validation"]) == 0
    sources = sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))[:3]
    images = tmp_path / "images"
    images.mkdir()
    for src in sources[:2]:
        shutil.copy(src, images / src.name)
    dataset = json.loads((synthetic_dataset / "dataset.json").read_text())
    names = {int(k): v for k, v in dataset["labels"].items() if int(k) != 0}
    assert names  # the synthetic dataset declares foreground labels
    capsys.readouterr()

    out = tmp_path / "out"
    predict = ["predict", "-i", str(images), "-o", str(out), "-m", str(work), "--device", "cpu"]
    assert main([*predict, "--statistics", "--preview"]) == 0
    printed = capsys.readouterr().out
    assert f"statistics of 2 case(s) in {out / 'statistics.json'}" in printed
    assert f"previews of 2 case(s) written to {out / 'previews'}" in printed
    doc = json.loads((out / "statistics.json").read_text())
    cases = [s.name[: -len(".nii.gz")] for s in sources]
    assert sorted(doc["cases"]) == cases[:2]
    for case, src in zip(cases[:2], sources):
        structures = doc["cases"][case]["structures"]
        assert {s["label"]: s["name"] for s in structures} == names  # every label, named as in dataset.json
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        spacing = sitk.ReadImage(str(src)).GetSpacing()
        for s in structures:
            assert s["voxels"] == int((seg == s["label"]).sum())
            assert s["volume_ml"] == pytest.approx(s["voxels"] * float(np.prod(spacing)) / 1000)
            assert (s["components"] > 0) == (s["voxels"] > 0) and (s["intensity_mean"] is None) == (s["voxels"] == 0)
        png = imread(out / "previews" / f"{case}.png")
        assert png.shape[:2] == preview_size_px(3)[::-1] and png[..., :3].std() > 0.01
    with (out / "statistics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["case"], int(r["label"])) for r in rows] == [(c, k) for c in cases[:2] for k in sorted(names)]
    assert sorted(p.name for p in images.iterdir()) == sorted(s.name for s in sources[:2])  # nothing beside the input

    # a rerun with one more case: the new case is predicted, the earlier rows and previews stay
    earlier = doc["cases"]
    shutil.copy(sources[2], images / sources[2].name)
    assert main([*predict, "--statistics", "--preview"]) == 0
    doc = json.loads((out / "statistics.json").read_text())
    assert sorted(doc["cases"]) == cases and all(doc["cases"][c] == earlier[c] for c in cases[:2])
    assert sorted(p.name for p in (out / "previews").iterdir()) == [f"{c}.png" for c in cases]
