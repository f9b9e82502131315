"""plan -> train (a few iterations) -> predict -> evaluate through the real CLI, on synthetic and real data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main

pytestmark = pytest.mark.slow


def _geometry(path: Path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _run_pipeline(
    data: Path, test_images: Path, tmp_path: Path, extra_train: list[str] | None = None
) -> tuple[Path, Path]:
    work = tmp_path / "work"
    assert main(["plan", str(data), "-o", str(work), "--num-workers", "2", "--device", "cpu"]) == 0
    plan = json.loads((work / "plans.json").read_text())
    assert "3d_fullres" in plan["configurations"]
    train_args = [
        "train",
        str(work),
        "--fold",
        "0",
        "--epochs",
        "2",
        "--iters-per-epoch",
        "3",
        "--device",
        "cpu",
        "--num-workers",
        "0",
    ] + (extra_train or [])
    assert main(train_args) == 0
    run = work / "runs" / "3d_fullres" / "unet" / "fold_0"
    for name in ("config.json", "plans.json", "checkpoint_final.pt", "checkpoint_latest.pt"):
        assert (run / name).is_file(), name
    assert (run / "validation" / "metrics.json").is_file()
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(test_images), "-o", str(out), "-m", str(work), "--device", "cpu"]) == 0
    return work, out


def test_synthetic_oblique_dataset_end_to_end(tmp_path, synthetic_dataset):
    test_images = tmp_path / "test_images"
    test_images.mkdir()
    for src in sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(src, test_images / src.name)
    work, out = _run_pipeline(synthetic_dataset, test_images, tmp_path)
    inputs = sorted(test_images.glob("*.nii.gz"))
    preds = sorted(out.glob("*.nii.gz"))
    assert [p.name for p in preds] == [p.name for p in inputs]
    declared = {int(k) for k in json.loads((synthetic_dataset / "dataset.json").read_text())["labels"]}
    for src, pred in zip(inputs, preds):
        assert _geometry(pred) == _geometry(src)  # exact origin, spacing, direction and size
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(pred)))).tolist())
        assert values <= declared
    # predicting again skips existing outputs; evaluate writes metrics
    mtime = preds[0].stat().st_mtime_ns
    assert main(["predict", "-i", str(test_images), "-o", str(out), "-m", str(work), "--no-tta"]) == 0
    assert preds[0].stat().st_mtime_ns == mtime
    refs = tmp_path / "refs"
    refs.mkdir()
    for p in preds:
        shutil.copy(synthetic_dataset / "labelsTr" / p.name, refs / p.name)
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", str(out), str(refs), "-o", str(metrics)]) == 0
    assert metrics.is_file() and metrics.with_suffix(".csv").is_file()


def test_real_hippocampus_subset_end_to_end(tmp_path, hippocampus_subset):
    data = hippocampus_subset(6)
    test = hippocampus_subset(1, start=150)
    _, out = _run_pipeline(data, test / "imagesTr", tmp_path)
    for src in sorted((test / "imagesTr").glob("*.nii.gz")):
        pred = out / src.name
        assert _geometry(pred) == _geometry(src)
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(pred)))).tolist())
        assert values <= {0, 1, 2}
