"""``medseg predict --time-budget-per-case`` through the real CLI: the record is written into the output folder,
a tiny budget lowers TTA and overlap, and the segmentations keep the input's geometry."""

from __future__ import annotations

import json
import shutil

import pytest

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, assert_prediction_like_input, shrink_networks

pytestmark = pytest.mark.slow


def test_time_budget_per_case_writes_the_record_and_keeps_the_geometry(tmp_path, synthetic_dataset, capsys):
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
    assert main(["train", str(work), "--fold", "0", *TINY_TRAIN, "--no-validation"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))[:2]
    for src in sources:
        shutil.copy(src, images / src.name)
    declared = {int(k) for k in json.loads((synthetic_dataset / "dataset.json").read_text())["labels"]}
    capsys.readouterr()

    tiny, full = tmp_path / "tiny", tmp_path / "full"
    assert (
        main(
            [
                "predict",
                "-i",
                str(images),
                "-o",
                str(tiny),
                "-m",
                str(work),
                "--device",
                "cpu",
                "--time-budget-per-case",
                "0.001",
            ]
        )
        == 0
    )
    assert "time budget 0.001 s per case (given): held in 0 of 2 case(s)" in capsys.readouterr().out
    # the plan has no training time budget: no limit by default
    assert main(["predict", "-i", str(images), "-o", str(full), "-m", str(work), "--device", "cpu"]) == 0
    assert "time budget" not in capsys.readouterr().out
    rec_tiny = json.loads((tiny / "prediction_record.json").read_text())
    rec_full = json.loads((full / "prediction_record.json").read_text())
    assert rec_tiny["time_budget_per_case"] == 0.001 and rec_full["time_budget_per_case"] is None
    assert "no training time budget" in rec_full["rule"]
    for src in sources:
        case = src.name[: -len(".nii.gz")]
        t, f = rec_tiny["cases"][case], rec_full["cases"][case]
        assert (t["tta_passes"], t["overlap"], t["held"], t["reduced"]) == (1, 0.0, False, True)
        assert f["tta_passes"] == f["full_tta_passes"] == t["full_tta_passes"] and f["overlap"] == 0.5
        for folder in (tiny, full):
            assert_prediction_like_input(folder / src.name, src, declared)
    assert sorted(p.name for p in images.iterdir()) == sorted(s.name for s in sources)  # nothing beside the input


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_a_budget_that_is_not_positive_seconds_or_none_is_refused(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as info:
        main(
            [
                "predict",
                "-i",
                str(tmp_path),
                "-o",
                str(tmp_path / "out"),
                "-m",
                str(tmp_path),
                "--time-budget-per-case",
                value,
            ]
        )
    assert info.value.code == 2
    assert "--time-budget-per-case" in capsys.readouterr().err
