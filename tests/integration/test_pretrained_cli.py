"""Fine-tuning through the real CLI: train a source model on the synthetic set, export it, and
``medseg train --pretrained`` on the same images with structures 2 and 3 merged into 1 (2 classes, not 4):
everything but the output heads is loaded, the run records it and trains to the end; a bad source exits
2 with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, shrink_networks

pytestmark = pytest.mark.slow
TRAIN = ["--fold", "0", *TINY_TRAIN]


def _merged(data: Path, out: Path) -> Path:
    """A copy of ``data`` with every structure merged into label 1 ("body")."""
    shutil.copytree(data, out)
    for path in sorted((out / "labelsTr").glob("*.nii.gz")):
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
        arr[arr > 1] = 1
        merged = sitk.GetImageFromArray(arr)
        merged.CopyInformation(img)
        sitk.WriteImage(merged, str(path))
    meta = json.loads((out / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "body"}
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out


def _plan(data: Path, work: Path) -> Path:
    assert (
        main(["plan", str(data), "-o", str(work), "--num-workers", "1", "--device", "cpu", "--configs", "3d_fullres"])
        == 0
    )
    shrink_networks(work)
    return work


def test_fine_tune_from_a_bundle_with_other_classes(tmp_path, synthetic_dataset, capsys):
    source = _plan(synthetic_dataset, tmp_path / "source")
    assert main(["train", str(source), *TRAIN]) == 0
    bundle = tmp_path / "model.zip"
    assert main(["export", str(source), "-o", str(bundle)]) == 0

    target = _plan(_merged(synthetic_dataset, tmp_path / "merged"), tmp_path / "target")
    capsys.readouterr()
    assert main(["train", str(target), *TRAIN, "--pretrained", str(tmp_path / "missing.zip")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "missing.zip: " in err and "Traceback" not in err, err

    assert main(["train", str(target), *TRAIN, "--pretrained", str(bundle)]) == 0
    run = target / "runs" / "3d_fullres" / "unet" / "fold_0"
    cfg = json.loads((run / "config.json").read_text())
    report = json.loads((run / "run_record.json").read_text())["pretrained_report"]
    assert cfg["pretrained"] == str(bundle) and report["member"].startswith("3d_fullres/unet/fold_0")
    heads = [n for n in report["skipped"] if n.startswith("heads.")]
    assert heads == report["skipped"] and "heads.0.weight" in heads and "heads.0.bias" in heads
    assert report["loaded"] > 0 and report["loaded"] + len(report["skipped"]) == report["tensors"]
    assert report["mismatched_shapes"]["heads.0.weight"][0].startswith("4x8")  # 4 classes -> 2
    assert report["mismatched_shapes"]["heads.0.weight"][1].startswith("2x8")
    assert (run / "checkpoint_final.pt").is_file()
    metrics = json.loads((run / "validation" / "metrics.json").read_text())
    assert set(metrics["mean_dice"]) == {"1"}
    log = (run / "training_log.txt").read_text()
    assert f"loaded {report['loaded']} of {report['tensors']} tensors" in log and "heads.0.weight (4x8" in log

    # a run checkpoint works as a source too: the same network and labels load completely
    again = tmp_path / "again"
    shutil.copytree(source, again)
    shutil.rmtree(again / "runs")
    ckpt = source / "runs" / "3d_fullres" / "unet" / "fold_0" / "checkpoint_final.pt"
    assert main(["train", str(again), *TRAIN, "--no-validation", "--pretrained", str(ckpt)]) == 0
    report = json.loads((again / "runs/3d_fullres/unet/fold_0/run_record.json").read_text())["pretrained_report"]
    assert report["loaded"] == report["tensors"] and report["skipped"] == []
