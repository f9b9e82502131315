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


def _capture_predict(monkeypatch) -> list[dict]:
    seen: list[dict] = []
    monkeypatch.setattr(medseg.ensembling, "work_dir_predictor", lambda *a, **k: object())
    monkeypatch.setattr(
        medseg.inference,
        "predict_folder",
        lambda inp, out, predictor, **kwargs: seen.append(kwargs) or PredictionResult(out),
    )
    return seen


def test_instances_flags_reach_the_instance_writer(tmp_path, monkeypatch):
    from medseg.postprocessing import InstanceOptions, InstanceWriter, QualityWriter

    seen = _capture_predict(monkeypatch)
    base = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path), "--device", "cpu"]
    assert main(base) == 0
    assert isinstance(seen[-1]["case_hook"], QualityWriter)  # quality.json is always written; no instances
    assert main([*base, "--instances"]) == 0
    quality, instances = seen[-1]["case_hook"].hooks
    assert isinstance(quality, QualityWriter) and isinstance(instances, InstanceWriter)
    assert instances.options == InstanceOptions()
    flags = ["--instances", "--instance-connectivity", "1", "--split-touching", "--min-separation-mm", "4.5"]
    assert main([*base, *flags]) == 0
    assert seen[-1]["case_hook"].hooks[1].options == InstanceOptions(1, True, 4.5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--split-touching"], "--split-touching needs --instances"),
        (["--instance-connectivity", "2"], "--instance-connectivity needs --instances"),
        (["--instances", "--min-separation-mm", "3"], "--min-separation-mm needs --split-touching"),
        (["--instances", "--split-touching", "--min-separation-mm", "0"], "must be > 0 mm"),
    ],
)
def test_instance_options_without_their_prerequisite_are_refused(tmp_path, monkeypatch, capsys, flags, message):
    seen = _capture_predict(monkeypatch)
    base = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path), "--device", "cpu"]
    assert main([*base, *flags]) == 2
    assert message in capsys.readouterr().err and not seen


def test_part_reaches_predict_folder_and_the_instance_writer_as_a_shard(tmp_path, monkeypatch, capsys):
    from medseg.inference.shards import Shard

    seen = _capture_predict(monkeypatch)
    base = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path), "--device", "cpu"]
    assert main(base) == 0 and seen[-1]["shard"] is None
    assert main([*base, "--part", "2/3", "--instances"]) == 0
    assert seen[-1]["shard"] == Shard(1, 3)
    quality, instances = seen[-1]["case_hook"].hooks
    assert instances.path == tmp_path / "out" / "instances.part-2-of-3.json"
    assert quality.path == tmp_path / "out" / "quality.part-2-of-3.json"
    assert main([*base, "--part", "1/1"]) == 0 and seen[-1]["shard"] is None  # one part: a plain run
    calls = len(seen)
    assert main([*base, "--part", "4/3"]) == 2
    assert "K/N" in capsys.readouterr().err and len(seen) == calls


@pytest.mark.parametrize("flag, expected", [(None, "auto"), ("auto", "auto"), ("none", None), ("4", 4.0)])
def test_max_ram_flag_reaches_the_predictor(tmp_path, monkeypatch, flag, expected):
    built: list[dict] = []
    _capture_predict(monkeypatch)
    monkeypatch.setattr(medseg.ensembling, "work_dir_predictor", lambda *a, **k: built.append(k) or object())
    args = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path), "--device", "cpu"]
    if flag is not None:
        args += ["--max-ram", flag]
    assert main(args) == 0
    assert built[0]["max_ram_gb"] == expected


_GB = "expected GB > 0, 'none' (no limit) or 'auto'"
_DICE = "expected a Dice between 0 and 1"


@pytest.mark.parametrize(
    "option, flag, message",
    [("--max-ram", v, _GB) for v in ("0", "-2", "lots")]
    + [("--review-below", v, _DICE) for v in ("1.5", "-0.1", "good")],
)
def test_value_flags_refuse_what_they_cannot_mean(tmp_path, capsys, option, flag, message):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path), option, flag])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
