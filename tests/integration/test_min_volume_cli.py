"""The minimum component volume round-trips through the real CLI: ``find-best --metric lesion_f1`` fits it on the
cross-validation predictions and stores it in ``postprocessing.json``; ``medseg predict`` applies it with each
case's own spacing (no component below the volume in mL remains; ``--no-postprocessing`` keeps them)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from medseg.io.image import read_image
from medseg.io.synthetic_lesions import generate_lesion_dataset
from medseg.postprocessing import apply_postprocessing, load_rules
from medseg.postprocessing.operations import label_components, voxel_ml
from tests.helpers import TINY_TRAIN, shrink_networks

pytestmark = pytest.mark.slow


def _speckled_validation(work, data) -> int:
    """Replace fold 0's validation probabilities by the reference plus one-voxel false lesions (what a model that
    finds every lesion but adds specks predicts); returns how many cases were replaced."""
    files = sorted((work / "runs" / "3d_fullres" / "unet" / "fold_0" / "validation").glob("*.npz"))
    for path in files:
        ref = read_image(data / "labelsTr" / path.name.replace(".npz", ".nii.gz"))[0].astype(np.int64)
        seg = ref.copy()
        background = np.argwhere(ref == 0)
        rng = np.random.default_rng(len(files))
        for z, y, x in background[rng.choice(len(background), 4, replace=False)]:
            seg[z, y, x] = 1
        probs = (np.eye(2)[seg] * 0.8 + 0.1).astype(np.float16).transpose(3, 0, 1, 2)  # argmax = seg
        buf = io.BytesIO()
        np.savez_compressed(buf, probabilities=probs)
        path.write_bytes(buf.getvalue())
    return len(files)


def test_find_best_fits_a_min_volume_and_predict_applies_it_at_each_spacing(tmp_path, capsys):
    data = generate_lesion_dataset(tmp_path / "data", num_cases=6, shape=(24, 32, 32), z_spacings=(1.0, 2.0))
    work = tmp_path / "work"
    plan = ["plan", str(data), "-o", str(work), "--num-workers", "1", "--device", "cpu", "--configs", "3d_fullres"]
    assert main(plan) == 0
    shrink_networks(work)
    assert main(["train", str(work), "--fold", "0", *TINY_TRAIN]) == 0
    assert _speckled_validation(work, data) >= 1
    assert main(["find-best", str(work), "--metric", "lesion_f1", "-q"]) == 0
    rules = load_rules(work / "postprocessing.json")
    steps = rules["per_label"]["1"]
    assert steps[0]["op"] == "min_volume" and steps[0]["ml"] > 0
    assert rules["scores"]["lesion_f1_after"]["1"] > rules["scores"]["lesion_f1_before"]["1"]
    assert "min_volume_" in json.loads((work / "best.json").read_text())["postprocessing_summary"]

    held = generate_lesion_dataset(tmp_path / "held", num_cases=2, seed=7, shape=(24, 32, 32), z_spacings=(1.0, 2.0))
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted((held / "imagesTr").glob("*.nii.gz")):
        shutil.copy(src, images / src.name)
    common = ["-i", str(images), "-m", str(work), "--device", "cpu", "--no-tta"]
    capsys.readouterr()
    assert main(["predict", "-o", str(tmp_path / "post"), *common]) == 0
    assert main(["predict", "-o", str(tmp_path / "raw"), "--no-postprocessing", *common]) == 0
    for src in sorted(images.glob("*.nii.gz")):
        spacing = tuple(reversed(sitk.ReadImage(str(src)).GetSpacing()))  # (Z, Y, X) mm
        post = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "post" / src.name)))
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "raw" / src.name)))
        np.testing.assert_array_equal(post, apply_postprocessing(raw, rules, spacing))
        sizes = label_components(post == 1)[1][1:]
        volumes = sizes * voxel_ml(spacing)
        assert (volumes >= steps[0]["ml"]).all()  # nothing smaller than the fitted volume is left
