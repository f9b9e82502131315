"""The run record (run_record.json): what a run did, apart from its settings; old run folders still work."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medseg.ensembling.bundle_export import export_bundle
from medseg.errors import ConfigError
from medseg.inference.bundle import load_bundle
from medseg.io.checkpoint import save_checkpoint
from medseg.training import TrainConfig, load_checkpoint, load_model_from_run, train
from medseg.training.run import read_run_record
from medseg.training.run_record import RUN_RECORD_KEYS, RunRecord

FAST = dict(
    iters_per_epoch=2, val_iters=1, num_workers=0, num_threads=1, precision="fp32", seed=3, final_validation=False
)
OLD = {
    "budget_fit": {"refit": True, "reason": "r", "fit_seconds": 1.5},
    "pretrained_report": {"loaded": 3, "tensors": 4},
    "precision_check": None,
}


def test_record_round_trip_and_errors(tmp_path):
    record = RunRecord(budget_fit={"refit": True, "to": {"patch_size": [8, 8, 8]}}, precision_check={"status": "ok"})
    (tmp_path / "r.json").write_text(record.to_json())
    assert RunRecord.load(tmp_path / "r.json") == record
    assert RUN_RECORD_KEYS == ("budget_fit", "pretrained_report", "precision_check", "intensity_augmentation")
    with pytest.raises(ConfigError, match="unknown key"):
        RunRecord.from_dict({"budget_fits": {}})
    assert "budget_fit" not in TrainConfig().to_dict()
    # a config.json written before the record existed: its settings load, the record's keys go to the record
    old = {**TrainConfig(epochs=2).to_dict(), **OLD}
    assert TrainConfig.from_dict(old) == TrainConfig(epochs=2)
    assert RunRecord.from_config_dict(old) == RunRecord(**OLD)
    assert RunRecord.from_config_dict(TrainConfig().to_dict()) == RunRecord()


def test_an_old_run_folder_resumes_predicts_and_exports(tiny_work):
    run = train(tiny_work, TrainConfig(epochs=1, fold="all", **FAST))
    assert json.loads((run / "run_record.json").read_text()) == RunRecord().to_dict()
    # turn the run into one written before the run record: its keys in config.json and the checkpoints
    (run / "run_record.json").unlink()
    config = {**json.loads((run / "config.json").read_text()), **OLD}
    (run / "config.json").write_text(json.dumps(config))
    for name in ("latest", "final"):
        ckpt = load_checkpoint(run / f"checkpoint_{name}.pt")
        ckpt["train_config"] = {**ckpt["train_config"], **OLD}
        save_checkpoint(ckpt, run / f"checkpoint_{name}.pt")
    assert read_run_record(run) == RunRecord(**OLD)
    assert TrainConfig.load(run / "config.json").epochs == 1

    model, plan, configuration, arch = load_model_from_run(run)  # predict
    assert (configuration, arch) == ("3d_fullres", "unet")
    bundle = export_bundle(tiny_work, tiny_work / "model.zip")  # export
    assert load_bundle(bundle) is not None

    train(tiny_work, dataclasses.replace(TrainConfig(fold="all", **FAST), epochs=2), resume=True)  # resume
    assert load_checkpoint(run / "checkpoint_final.pt")["epoch"] == 2
    assert RunRecord.load(run / "run_record.json") == RunRecord(**OLD)  # migrated into its own file
    assert not set(RUN_RECORD_KEYS) & set(json.loads((run / "config.json").read_text()))


def test_training_settings_and_run_records_use_it(tmp_path):
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match=r"config\.json: cannot read the training configuration \(not valid JSON"):
        TrainConfig.load(tmp_path / "config.json")
    with pytest.raises(ConfigError, match=r"config\.json: cannot read the training configuration \(not valid JSON"):
        read_run_record(tmp_path)  # a run folder from before the run record: its keys are read from config.json
    with pytest.raises(ConfigError, match=r"run_record\.json: cannot read the run record \(.*No such file"):
        RunRecord.load(tmp_path / "run_record.json")
    (tmp_path / "config.json").write_text('{"epochs": "two"}')
    with pytest.raises(ConfigError, match=r"config\.json: training configuration\.epochs"):
        TrainConfig.load(tmp_path / "config.json")
