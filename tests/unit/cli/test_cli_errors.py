"""CLI behaviour on expected mistakes: one clear message, non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import json

import pytest

from medseg.cli.main import main


def test_plan_bad_dataset_reports_every_problem_without_traceback(tmp_path, capsys, synthetic_dataset):
    labels = sorted((synthetic_dataset / "labelsTr").glob("*.nii.gz"))
    labels[0].unlink()  # missing label
    images = sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))
    images[1].write_bytes(b"truncated")  # unreadable image
    work = tmp_path / "work"
    code = main(["plan", str(synthetic_dataset), "-o", str(work), "--num-workers", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert labels[0].name.split(".")[0] in err and images[1].name.split(".")[0] in err
    assert not (work / "plans.json").exists()


def test_plan_refuses_work_inside_input(synthetic_dataset, capsys):
    code = main(["plan", str(synthetic_dataset), "-o", str(synthetic_dataset / "work")])
    assert code == 2
    assert "inside the dataset folder" in capsys.readouterr().err
    assert not (synthetic_dataset / "work").exists()


def test_train_without_plan_is_a_clear_error(tmp_path, capsys):
    code = main(["train", str(tmp_path / "nowhere"), "--fold", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "plans.json" in err and "Traceback" not in err


def test_bad_fold_argument(tmp_path, capsys):
    code = main(["train", str(tmp_path), "--fold", "first"])
    assert code == 2
    assert "--fold" in capsys.readouterr().err


def test_unknown_subcommand_exits_nonzero():
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code != 0


def test_predict_without_trained_model(tmp_path, capsys, synthetic_dataset):
    work = tmp_path / "work"
    work.mkdir()
    (work / "plans.json").write_text(json.dumps({"not": "a plan"}))
    code = main(["predict", "-i", str(synthetic_dataset / "imagesTr"), "-o", str(tmp_path / "out"), "-m", str(work)])
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err
