"""Distillation and the dense CRF through the real CLI: two tiny teacher folds (find-best tries the CRF on their
CV), a student trained on their soft predictions in a work folder of its own (``train --distill-from``), then
predicted like any other run, with ``--postprocess crf``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, assert_prediction_like_input, shrink_networks

pytestmark = pytest.mark.slow


def test_distill_a_student_from_two_folds_and_predict(tmp_path, synthetic_dataset, capsys):
    teachers = tmp_path / "teachers"
    plan = ["plan", str(synthetic_dataset), "-o", str(teachers), "--num-workers", "1", "--device", "cpu"]
    assert main([*plan, "--configs", "3d_fullres"]) == 0
    shrink_networks(teachers)
    for fold in ("0", "1"):
        assert main(["train", str(teachers), "--fold", fold, *TINY_TRAIN]) == 0
    runs = teachers / "runs" / "3d_fullres" / "unet"

    # find-best tries the dense CRF on the CV cases and records every setting's score
    assert main(["find-best", str(teachers), "--try-crf"]) == 0
    search = json.loads((teachers / "postprocessing.json").read_text())["crf_search"]
    assert len(search["candidates"]) == 3 and search["seconds_per_case"] > 0

    # a run cannot be its own teacher
    own = ["train", str(teachers), "--fold", "0", *TINY_TRAIN, "--resume", "--distill-from", str(runs / "fold_0")]
    assert main(own) == 2
    assert "its own teacher" in capsys.readouterr().err

    student = tmp_path / "student"  # the same plan and preprocessed cases; no runs, no find-best choice
    shutil.copytree(
        teachers, student, ignore=shutil.ignore_patterns("runs", "best.json", "postprocessing.json", "soft_targets")
    )
    distill = ["--distill-from", str(runs / "fold_0"), str(runs / "fold_1"), "--distill-temperature", "3"]
    assert main(["train", str(student), "--fold", "0", *TINY_TRAIN, "--no-validation", *distill]) == 0
    run = student / "runs" / "3d_fullres" / "unet" / "fold_0"
    config = json.loads((run / "config.json").read_text())["distill"]
    assert config["temperature"] == 3.0 and config["teachers"] == [str(runs / "fold_0"), str(runs / "fold_1")]
    splits = json.loads((student / "splits.json").read_text())
    train_ids = sorted(splits[0]["train"]) if isinstance(splits, list) else None
    targets = sorted((student / "soft_targets" / "3d_fullres").glob("*/*.npy"))
    assert train_ids is None or sorted(p.stem for p in targets) == train_ids
    soft = np.load(targets[0])
    assert soft.dtype == np.float16 and soft.shape[0] == 4  # background + 3 labels
    np.testing.assert_allclose(soft.astype(np.float32).sum(0), 1.0, atol=5e-3)

    images = synthetic_dataset / "imagesTr"
    case = sorted(images.glob("*.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / case.name).symlink_to(case)
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(student), "--postprocess", "crf"]) == 0
    preds = sorted(out.glob("*.nii.gz"))
    assert len(preds) == 1
    assert_prediction_like_input(preds[0], case, {0, 1, 2, 3})
