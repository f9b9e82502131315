"""``medseg export`` through the real CLI: plan -> train -> find-best -> export; predicting from the zip alone
gives the work folder's labels; a broken zip exits 2 naming it; ONNX / TorchScript reproduce the logits."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, shrink_networks

pytestmark = pytest.mark.slow


@pytest.fixture
def trained(tmp_path, synthetic_dataset):
    work = tmp_path / "work"
    assert (
        main(
            [
                "plan",
                str(synthetic_dataset),
                "-o",
                str(work),
                "--num-workers",
                "1",
                "--device",
                "cpu",
                "--configs",
                "3d_fullres",
            ]
        )
        == 0
    )
    shrink_networks(work)
    assert main(["train", str(work), "--fold", "0", *TINY_TRAIN]) == 0
    assert main(["find-best", str(work)]) == 0
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(src, images / src.name)
    return work, images


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def test_predict_from_the_bundle_alone_equals_predict_from_work(trained, tmp_path, capsys):
    work, images = trained
    bundle = tmp_path / "export" / "model.zip"
    assert main(["export", str(work), "-o", str(bundle)]) == 0
    with zipfile.ZipFile(bundle) as zf:
        names = set(zf.namelist())
    assert {
        "manifest.json",
        "plans.json",
        "best.json",
        "postprocessing.json",
        "members/3d_fullres/unet/fold_0/model.pt",
    } <= names
    from_work = tmp_path / "pred_work"
    assert main(["predict", "-i", str(images), "-o", str(from_work), "-m", str(work), "--device", "cpu"]) == 0

    fresh = tmp_path / "fresh"  # a fresh folder, and no work folder anywhere
    fresh.mkdir()
    shutil.copy(bundle, fresh / "model.zip")
    shutil.rmtree(work)
    from_zip = fresh / "pred"
    assert (
        main(["predict", "-i", str(images), "-o", str(from_zip), "-m", str(fresh / "model.zip"), "--device", "cpu"])
        == 0
    )
    a, b = _labels(from_work), _labels(from_zip)
    assert list(a) == list(b) == [p.name for p in sorted(images.glob("*.nii.gz"))]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)

    data = bundle.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the weights: their CRC no longer matches
    for name, broken_data in (("truncated.zip", data[:-100]), ("flipped.zip", bytes(flipped))):
        capsys.readouterr()
        broken = fresh / name
        broken.write_bytes(broken_data)
        assert main(["predict", "-i", str(images), "-o", str(fresh / "p2"), "-m", str(broken)]) == 2
        err = capsys.readouterr().err
        assert f"error: {broken}: " in err and "corrupt" in err and "Traceback" not in err, err
    assert not (fresh / "p2").exists() or not list((fresh / "p2").glob("*.nii.gz"))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_networks_reproduce_the_logits(trained, tmp_path, fmt):
    from medseg.inference.members import load_member
    from medseg.inference.network_export import run_exported

    work, _ = trained
    out = tmp_path / fmt
    assert main(["export", str(work), "--format", fmt, "-o", str(out)]) == 0
    info = json.loads((out / "inference.json").read_text())
    (net,) = info["networks"]
    assert net["configuration"] == "3d_fullres" and net["fold"] == "fold_0"
    plan = json.loads((work / "plans.json").read_text())
    cfg = plan["configurations"]["3d_fullres"]
    assert net["patch_size"] == cfg["networks"]["unet"]["patch_size"] and net["spacing_zyx_mm"] == cfg["spacing"]
    assert info["label_ids"] == plan["label_ids"] and info["postprocessing"] is not None

    member = load_member(work / "runs" / "3d_fullres" / "unet" / "fold_0")
    x = torch.randn(2, len(plan["channel_names"]), *net["patch_size"])
    with torch.no_grad():
        ref = member.model(x).numpy()
    got = run_exported((out / net["file"]).read_bytes(), fmt, x.numpy())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
