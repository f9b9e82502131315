"""MONAI's SegResNetDS through the real CLI beside the U-Net: plan both (``--archs unet segresnet``), train
both, find-best ranks them and their ensemble, predict with the ensemble, export the bundle, ONNX and
TorchScript, and fine-tune ``segresnet`` from the bundle (every tensor loads)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, shrink_networks

pytestmark = pytest.mark.slow


def test_segresnet_plans_trains_ensembles_exports_and_fine_tunes(tmp_path, synthetic_dataset, caplog):
    work = tmp_path / "work"
    plan_args = ["plan", str(synthetic_dataset), "-o", str(work), "--num-workers", "1", "--device", "cpu"]
    assert main([*plan_args, "--configs", "3d_fullres", "--archs", "unet", "segresnet"]) == 0
    nets = json.loads((work / "plans.json").read_text())["configurations"]["3d_fullres"]["networks"]
    assert set(nets) == {"unet", "segresnet"} and nets["segresnet"]["estimated_memory_gb"] > 0
    shrink_networks(work)
    for arch in ("unet", "segresnet"):
        assert main(["train", str(work), "--fold", "0", *TINY_TRAIN, "--arch", arch]) == 0
    assert main(["find-best", str(work)]) == 0
    ranked = json.loads((work / "best.json").read_text())
    assert "segresnet" in json.dumps(ranked) and "unet" in json.dumps(ranked)

    images = tmp_path / "images"
    images.mkdir()
    first = sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))[0]
    shutil.copy(first, images / first.name)
    out = tmp_path / "pred"
    predict = ["predict", "-i", str(images), "-o", str(out), "-m", str(work), "--device", "cpu"]
    with caplog.at_level(logging.INFO, logger="medseg.ensembling.selection"):
        assert main([*predict, "--arch", "unet", "segresnet"]) == 0
    assert "ensemble of 2 network(s): 3d_fullres/unet/fold_0, 3d_fullres/segresnet/fold_0" in caplog.text
    assert (out / first.name).is_file()

    bundle = tmp_path / "model.zip"
    assert main(["export", str(work), "-o", str(bundle)]) == 0
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".torchscript.pt")):
        assert main(["export", str(work), "--format", fmt, "-o", str(tmp_path / fmt), "--arch", "segresnet"]) == 0
        assert (tmp_path / fmt / "3d_fullres" / "segresnet" / f"fold_0{suffix}").is_file()

    assert (
        main(["train", str(work), "--fold", "1", *TINY_TRAIN, "--arch", "segresnet", "--pretrained", str(bundle)]) == 0
    )
    record = json.loads((work / "runs" / "3d_fullres" / "segresnet" / "fold_1" / "run_record.json").read_text())
    report = record["pretrained_report"]
    assert report["member"].startswith("3d_fullres/segresnet/fold_0")
    assert report["loaded"] == report["tensors"] > 0 and report["skipped"] == []
