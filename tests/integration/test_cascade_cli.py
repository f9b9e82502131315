"""The cascade (issue 20 part 3) through the real CLI: plan (3d_lowres and 3d_cascade_fullres planned), train
the 3d_lowres folds, the refusal of the cascade while a lowres fold is missing, the cascade fold, find-best,
predict with the cascade (lowres first) and evaluate.

A small memory budget (``--gpu-memory-gb 0.03``) makes the 3d_fullres patch cover a few percent of the
synthetic images, so 3d_lowres is planned; ``splits.json`` is edited to two folds to keep the run short.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, assert_prediction_like_input, shrink_networks

pytestmark = pytest.mark.slow
TRAIN = [*TINY_TRAIN, "-q"]


def test_cascade_end_to_end(tmp_path, capsys):
    from medseg.io.synthetic import generate_synthetic_dataset

    data = generate_synthetic_dataset(tmp_path / "data", num_cases=6, seed=4, shape=(24, 64, 64))
    work = tmp_path / "work"
    assert (
        main(
            [
                "plan",
                str(data),
                "-o",
                str(work),
                "--device",
                "cpu",
                "--num-workers",
                "1",
                "-q",
                "--gpu-memory-gb",
                "0.03",
                "--configs",
                "3d_lowres",
                "3d_cascade_fullres",
            ]
        )
        == 0
    )
    plan = json.loads((work / "plans.json").read_text())
    cascade = plan["configurations"]["3d_cascade_fullres"]
    full = plan["configurations"]["3d_fullres"]
    assert cascade["previous_stage"] == "3d_lowres" and "3d_lowres" in plan["configurations"]
    assert cascade["data_identifier"] == full["data_identifier"] and cascade["networks"] == full["networks"]
    shrink_networks(work, 4)
    ids = sorted(p.name[: -len(".nii.gz")] for p in (data / "labelsTr").glob("*.nii.gz"))
    (work / "splits.json").write_text(
        json.dumps([{"train": ids[3:], "val": ids[:3]}, {"train": ids[:3], "val": ids[3:]}])
    )

    assert main(["train", str(work), "--config", "3d_lowres", "--fold", "0", *TRAIN]) == 0
    capsys.readouterr()
    # fold 1 of 3d_lowres is missing: the cascade is refused, naming it and the command that trains it
    assert main(["train", str(work), "--config", "3d_cascade_fullres", "--fold", "0", *TRAIN]) == 2
    err = capsys.readouterr().err
    assert "3d_lowres fold 1" in err and f"medseg train {work} --config 3d_lowres --arch unet --fold 1" in err
    assert "Traceback" not in err
    assert main(["train", str(work), "--config", "3d_lowres", "--fold", "1", *TRAIN]) == 0
    assert main(["train", str(work), "--config", "3d_cascade_fullres", "--fold", "0", *TRAIN]) == 0
    run = work / "runs" / "3d_cascade_fullres" / "unet" / "fold_0"
    metrics = json.loads((run / "validation" / "metrics.json").read_text())
    assert metrics["num_cases"] == 3 and metrics["configuration"] == "3d_cascade_fullres"
    stored = sorted((work / "preprocessed" / "3d_cascade_fullres_from_3d_lowres").glob("*.npz"))
    assert len(stored) == len(ids)  # every case's cross-validated lowres segmentation, on the fullres grid

    assert main(["find-best", str(work), "-q"]) == 0
    best = json.loads((work / "best.json").read_text())
    assert "3d_cascade_fullres/unet" in [r["candidate"] for r in best["ranking"]]

    inp, out = tmp_path / "in", tmp_path / "pred"
    inp.mkdir()
    images = sorted((data / "imagesTr").glob("*.nii.gz"))[:2]
    for p in images:
        shutil.copy(p, inp / p.name)
    assert (
        main(
            [
                "predict",
                "-i",
                str(inp),
                "-o",
                str(out),
                "-m",
                str(work),
                "--config",
                "3d_cascade_fullres",
                "--device",
                "cpu",
                "--no-tta",
                "-q",
            ]
        )
        == 0
    )
    # find-best's choice (whichever of lowres, cascade or both won)
    assert (
        main(
            [
                "predict",
                "-i",
                str(inp),
                "-o",
                str(tmp_path / "pred_best"),
                "-m",
                str(work),
                "--device",
                "cpu",
                "--no-tta",
                "-q",
            ]
        )
        == 0
    )
    for src in images:
        assert_prediction_like_input(out / src.name, src, {0, 1, 2, 3})
        assert_prediction_like_input(tmp_path / "pred_best" / src.name, src, {0, 1, 2, 3})
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(out), str(data / "labelsTr"), "-o", str(report), "--num-workers", "1", "-q"]) == 0
    assert json.loads(report.read_text())["num_cases"] == 2
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / images[0].name)))
    assert np.isin(seg, [0, 1, 2, 3]).all()

    assert main(["export", str(work), "-o", str(tmp_path / "model.zip"), "--config", "3d_cascade_fullres", "-q"]) == 2
    assert "cascade" in capsys.readouterr().err and not (tmp_path / "model.zip").exists()
