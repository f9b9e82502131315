"""Snapshot ensembles through the real CLI: ``medseg train --snapshots 2`` writes a checkpoint per cycle and
``medseg predict --checkpoint snapshots`` predicts with both; ``export`` keeps to one checkpoint per run."""

from __future__ import annotations

import json

import pytest

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, assert_prediction_like_input, shrink_networks

pytestmark = pytest.mark.slow


def test_train_snapshots_and_predict_with_them(tmp_path, synthetic_dataset, capsys, caplog):
    work = tmp_path / "work"
    plan = ["plan", str(synthetic_dataset), "-o", str(work), "--num-workers", "1", "--device", "cpu"]
    assert main([*plan, "--configs", "3d_fullres"]) == 0
    shrink_networks(work)
    assert main(["train", str(work), "--fold", "0", *TINY_TRAIN, "--snapshots", "2", "--no-validation"]) == 0
    run = work / "runs" / "3d_fullres" / "unet" / "fold_0"
    assert sorted(p.name for p in run.glob("checkpoint_snapshot_*.pt")) == [
        "checkpoint_snapshot_1.pt",
        "checkpoint_snapshot_2.pt",
    ]
    config = json.loads((run / "config.json").read_text())
    assert (config["lr_schedule"], config["cosine_cycles"], config["snapshots"]) == ("cosine_restarts", 2, True)

    images = synthetic_dataset / "imagesTr"
    case = sorted(images.glob("*.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / case.name).symlink_to(case)
    caplog.set_level("INFO")
    out = tmp_path / "pred"
    assert main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(work), "--checkpoint", "snapshots"]) == 0
    assert "snapshot ensemble: 2 members from 1 run(s)" in caplog.text
    preds = sorted(out.glob("*.nii.gz"))
    assert len(preds) == 1
    assert_prediction_like_input(preds[0], case, {0, 1, 2, 3})

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["export", str(work), "-o", str(tmp_path / "m.zip"), "--checkpoint", "snapshots"])
    assert "--checkpoint" in capsys.readouterr().err
