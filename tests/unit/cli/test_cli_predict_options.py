"""`medseg predict --time-budget-per-case` reaches predict_folder: seconds, 'none' (no limit) or the default rule."""

from __future__ import annotations

import pytest

import medseg.ensembling
import medseg.inference
from medseg.cli.main import main
from medseg.inference import PredictionResult


@pytest.mark.parametrize(
    "flag, expected", [(None, "auto"), ("auto", "auto"), ("none", None), ("NONE", None), ("7.5", 7.5)]
)
def test_time_budget_per_case_flag(tmp_path, monkeypatch, capsys, flag, expected):
    seen = []
    monkeypatch.setattr(medseg.ensembling, "work_dir_predictor", lambda *a, **k: object())
    monkeypatch.setattr(
        medseg.inference,
        "predict_folder",
        lambda inp, out, predictor, **kwargs: seen.append(kwargs) or PredictionResult(out),
    )
    args = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path), "--device", "cpu"]
    if flag is not None:
        args += ["--time-budget-per-case", flag]
    assert main(args) == 0
    assert seen[0]["time_budget_per_case"] == expected


def test_help_states_the_default_rule(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--time-budget-per-case SECONDS" in text and "10% of it over 20 cases" in text and "'none'" in text
