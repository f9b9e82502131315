"""train() on a tiny synthetic work folder: outputs, resume equivalence, crash safety, budgets."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.errors import CheckpointError, ConfigError
from medseg.training import TrainConfig, load_checkpoint, load_model_from_run, train
from medseg.training.config import AugmentationConfig
from medseg.training.trainer import Trainer

# one thread: fast on a busy CI machine (two OpenMP threads stall each other when cores are shared)
FAST = dict(iters_per_epoch=3, val_iters=1, num_workers=0, num_threads=1, precision="fp32", seed=3)


def _weights(run_dir, name="latest"):
    return load_checkpoint(run_dir / f"checkpoint_{name}.pt")["model"]


def test_train_writes_a_complete_run_folder(tiny_work):
    run = train(tiny_work, TrainConfig(epochs=2, **FAST))
    assert run == tiny_work / "runs" / "3d_fullres" / "unet" / "fold_0"
    for name in (
        "config.json",
        "plans.json",
        "checkpoint_latest.pt",
        "checkpoint_best.pt",
        "checkpoint_final.pt",
        "training_log.txt",
        "training_curves.png",
        "progress.json",
        "validation/metrics.json",
    ):
        assert (run / name).is_file(), name
    cfg = TrainConfig.load(run / "config.json")
    assert cfg.epochs == 2 and cfg.configuration == "3d_fullres" and cfg.arch == "unet"
    ckpt = load_checkpoint(run / "checkpoint_final.pt")
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 6 and len(ckpt["history"]) == 2
    assert ckpt["finished"] is True
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "finished" and progress["history"][-1]["lr"] < 1e-2
    assert "data_wait_seconds" in progress["history"][0]
    assert "epoch 2" in (run / "training_log.txt").read_text()

    splits = json.loads((tiny_work / "splits.json").read_text())
    val = splits[0]["val"]
    metrics = json.loads((run / "validation" / "metrics.json").read_text())
    assert sorted(metrics["per_case"]) == sorted(val) and set(metrics["mean_dice"]) == {"1", "2", "3"}
    ref_root = json.loads((tiny_work / "dataset_ref.json").read_text())["root"]
    for cid in val:
        pred = sitk.ReadImage(str(run / "validation" / f"{cid}.nii.gz"))
        img = sitk.ReadImage(f"{ref_root}/imagesTr/{cid}.nii.gz")
        assert pred.GetSize() == img.GetSize() and pred.GetSpacing() == img.GetSpacing()
        assert pred.GetOrigin() == img.GetOrigin() and pred.GetDirection() == img.GetDirection()
        with np.load(run / "validation" / f"{cid}.npz") as f:
            probs = f["probabilities"]
        assert probs.dtype == np.float16 and probs.shape == (4, *sitk.GetArrayFromImage(img).shape)
        assert np.allclose(probs.astype(np.float32).sum(0), 1.0, atol=1e-2)

    model, plan, configuration, arch = load_model_from_run(run)
    assert not model.training and configuration == "3d_fullres" and arch == "unet" and plan.num_classes == 4
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 8, 16, 16)).shape == (1, 4, 8, 16, 16)

    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_work, TrainConfig(epochs=2, **FAST))


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tiny_work, monkeypatch):
    cfg = TrainConfig(epochs=3, final_validation=False, deterministic=True, **FAST)
    straight = train(tiny_work, cfg)
    reference = _weights(straight)
    import shutil

    shutil.rmtree(tiny_work / "runs")

    original_end = Trainer._end_epoch

    def crash_after_first_epoch(self, stats, val):
        original_end(self, stats, val)
        if self.epoch == 1:
            raise KeyboardInterrupt("simulated kill after epoch 1")

    monkeypatch.setattr(Trainer, "_end_epoch", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_work, cfg)
    monkeypatch.setattr(Trainer, "_end_epoch", original_end)
    run = tiny_work / "runs" / "3d_fullres" / "unet" / "fold_0"
    assert load_checkpoint(run / "checkpoint_latest.pt")["epoch"] == 1
    assert not (run / "checkpoint_final.pt").exists()
    # a kill during the next checkpoint write leaves a truncated temporary file behind
    (run / ".tmp_ckpt_killed.pt").write_bytes(b"PK\x03\x04truncated")
    train(tiny_work, cfg, resume=True)
    assert not (run / ".tmp_ckpt_killed.pt").exists()
    resumed = _weights(run)
    assert load_checkpoint(run / "checkpoint_final.pt")["iteration"] == 9
    for k in reference:
        assert torch.allclose(resumed[k].float(), reference[k].float(), rtol=1e-5, atol=1e-6), k


def test_resume_extends_a_finished_run_and_rejects_corrupt_checkpoints(tiny_work):
    cfg = TrainConfig(epochs=1, final_validation=False, **FAST)
    run = train(tiny_work, cfg)
    train(tiny_work, TrainConfig(epochs=2, final_validation=False, **FAST), resume=True)
    ckpt = load_checkpoint(run / "checkpoint_final.pt")
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 6 and ckpt["train_config"]["epochs"] == 2
    assert TrainConfig.load(run / "config.json").epochs == 2
    # resuming a finished run without a larger --epochs trains nothing
    before = (run / "checkpoint_final.pt").stat().st_mtime_ns
    train(tiny_work, TrainConfig(epochs=2, final_validation=False, **FAST), resume=True)
    assert (run / "checkpoint_final.pt").stat().st_mtime_ns == before

    data = (run / "checkpoint_latest.pt").read_bytes()
    (run / "checkpoint_latest.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="checkpoint_latest.pt"):
        train(tiny_work, TrainConfig(epochs=3, **FAST), resume=True)


def test_time_budget_anneals_over_elapsed_time(tiny_work, monkeypatch):
    from medseg.training import intensity_augmentation

    intensity_draws = []
    draw = intensity_augmentation.draw_intensity

    def spy(rngs, aug, dims):
        intensity_draws.append(draw(rngs, aug, dims))
        return intensity_draws[-1]

    monkeypatch.setattr("medseg.training.data.draw_intensity", spy)
    budget_min = 0.15  # 9 seconds
    # keep_plan: this test is about the schedule of the tiny network, not about refitting it to the budget
    run = train(
        tiny_work,
        TrainConfig(
            time_budget_minutes=budget_min,
            iters_per_epoch=20,
            val_iters=1,
            num_workers=0,
            num_threads=1,
            precision="fp32",
            fold="all",
            keep_plan=True,
        ),
    )
    ckpt = load_checkpoint(run / "checkpoint_final.pt")
    assert run.name == "fold_all"
    assert ckpt["iteration"] >= 5
    assert ckpt["elapsed_seconds"] <= budget_min * 60 + 2
    lrs = [h["lr"] for h in ckpt["history"]]
    # a time-budgeted run resolves optimizer "auto" to AdamW at 3e-3 and stores the concrete choice
    assert ckpt["train_config"]["optimizer"] == "adamw" and ckpt["train_config"]["lr"] == 3e-3
    assert "exp_avg" in ckpt["optimizer"]["state"][0]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.9 * 3e-3  # annealed over elapsed time
    assert ckpt["scheduler"]["progress"] > 0.8  # the schedule ran (almost) to its end
    assert not (run / "validation").exists()  # fold all: nothing held out
    assert ckpt["train_config"]["time_budget_minutes"] == budget_min
    # a short schedule chooses its intensity transforms from the training cases and records why: 6 cases
    # are too few to show a homogeneous contrast, so they stay on (nnU-Net's choice)
    decision = json.loads((run / "run_record.json").read_text())["intensity_augmentation"]
    assert decision["intensity"] is True and decision["spread"] is None and decision["cases"] == 6
    assert ckpt["train_config"]["augmentation"]["intensity"] is True
    assert any(d is not None for d in intensity_draws)
    # ... and puts the EMA of its weights into checkpoint_final (raw weights stay in checkpoint_latest)
    assert ckpt["train_config"]["weight_averaging"] == "ema"
    latest = load_checkpoint(run / "checkpoint_latest.pt")
    assert latest["weight_average"] is not None
    assert any(not torch.equal(v, latest["model"][k]) for k, v in ckpt["model"].items() if v.is_floating_point())

    # --resume --time-budget with a larger budget extends the run
    train(tiny_work, TrainConfig(time_budget_minutes=2 * budget_min, fold="all"), resume=True)
    extended = load_checkpoint(run / "checkpoint_final.pt")
    assert extended["train_config"]["time_budget_minutes"] == 2 * budget_min
    assert extended["iteration"] > ckpt["iteration"]
    assert extended["elapsed_seconds"] <= 2 * budget_min * 60 + 3


def test_2d_configuration_with_workers_adamw_and_cosine(tiny_work):
    run = train(
        tiny_work,
        TrainConfig(
            configuration="2d",
            epochs=1,
            iters_per_epoch=2,
            val_iters=1,
            num_workers=1,
            num_threads=1,
            optimizer="adamw",
            lr_schedule="cosine_restarts",
            focal_gamma=2.0,
            batch_dice=True,
            final_validation=False,
            fold=1,
        ),
    )
    assert run == tiny_work / "runs" / "2d" / "unet" / "fold_1"
    ckpt = load_checkpoint(run / "checkpoint_final.pt")
    assert ckpt["iteration"] == 2 and "exp_avg" in str(ckpt["optimizer"]["state"][0].keys())


def _set_mirror_axes(work, axes):
    from medseg.planning.plan import Plan

    plan = Plan.load(work / "plans.json")
    cfg = plan.configuration("3d_fullres")
    cfg = dataclasses.replace(cfg, mirror_axes=axes)
    dataclasses.replace(plan, configurations={**plan.configurations, "3d_fullres": cfg}).save(work / "plans.json")


def test_training_mirrors_the_planned_axes_and_records_them_for_tta(tiny_work, monkeypatch):
    from medseg.training import augmentation

    seen: set[int] = set()
    draw = augmentation.draw_spatial

    def spy(rng, center, aug, dims, anisotropic):
        params = draw(rng, center, aug, dims, anisotropic)
        if aug is not None:
            seen.update(aug.mirror_axes)
        return params

    monkeypatch.setattr("medseg.training.data.draw_spatial", spy)
    _set_mirror_axes(tiny_work, (1, 2))
    run = train(tiny_work, TrainConfig(epochs=1, final_validation=False, **FAST))
    assert seen == {1, 2}
    assert load_checkpoint(run / "checkpoint_final.pt")["plan"]["configurations"]["3d_fullres"]["mirror_axes"] == [1, 2]

    # the run's own setting wins over the plan's, and is what the checkpoint tells prediction to flip
    seen.clear()
    cfg = TrainConfig(
        epochs=1, final_validation=False, fold=1, augmentation=AugmentationConfig(mirror_axes=(0,)), **FAST
    )
    run = train(tiny_work, cfg)
    assert seen == {0}
    assert load_checkpoint(run / "checkpoint_final.pt")["plan"]["configurations"]["3d_fullres"]["mirror_axes"] == [0]

    with pytest.raises(ConfigError, match=r"axes \[3\] are not axes of the 3D patch"):
        train(tiny_work, TrainConfig(epochs=1, fold=2, augmentation=AugmentationConfig(mirror_axes=(3,)), **FAST))


def test_weight_averaging_puts_the_average_into_checkpoint_final(tiny_work):
    cfg = TrainConfig(epochs=4, final_validation=False, weight_averaging="ema", **FAST)
    run = train(tiny_work, cfg)
    latest, final = load_checkpoint(run / "checkpoint_latest.pt"), load_checkpoint(run / "checkpoint_final.pt")
    wa = latest["weight_average"]
    assert wa["updates"] >= 5  # the second half of 12 steps
    conv = next(k for k, v in final["model"].items() if k.endswith("weight") and v.dim() == 5)
    # latest keeps the raw weights to resume from, final holds the average
    assert torch.equal(latest["model"][conv], _weights(run, "latest")[conv])
    assert torch.allclose(final["model"][conv], wa["shadow"][conv])
    assert not torch.allclose(final["model"][conv], latest["model"][conv])
    # resuming restores the average and keeps averaging
    train(tiny_work, TrainConfig(epochs=5, final_validation=False, weight_averaging="ema", **FAST), resume=True)
    assert load_checkpoint(run / "checkpoint_latest.pt")["weight_average"]["updates"] > wa["updates"]


def _poison_gradients(monkeypatch, bad_iterations, record):
    """Make one weight's gradient NaN in the steps of ``bad_iterations`` (0-based) and record, for each
    such step, whether the weights were left exactly as they were."""
    original = Trainer.train_step

    def step(self, x, y):
        if not bad_iterations(self.iteration):
            return original(self, x, y)
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        hook = next(self.model.parameters()).register_hook(lambda g: torch.full_like(g, float("nan")))
        try:
            loss = original(self, x, y)
        finally:
            hook.remove()
        record.append(all(torch.equal(before[k], v) for k, v in self.model.state_dict().items()))
        return loss

    monkeypatch.setattr(Trainer, "train_step", step)


def test_a_step_with_non_finite_gradients_is_skipped_and_training_goes_on(tiny_work, monkeypatch, caplog):
    unchanged: list[bool] = []
    _poison_gradients(monkeypatch, lambda it: it == 2, unchanged)
    run = train(tiny_work, TrainConfig(epochs=2, final_validation=False, **FAST))
    assert unchanged == [True]  # the poisoned step left every weight as it was
    assert "iteration 3: gradient norm nan, the optimizer step was skipped (1 skipped so far)" in caplog.text
    final = _weights(run, "final")
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    assert load_checkpoint(run / "checkpoint_final.pt")["iteration"] == 6  # the other steps all ran


def test_training_that_diverges_stops_with_a_clear_error_and_finite_checkpoint(tiny_work, monkeypatch):
    from medseg.errors import TrainingError
    from medseg.training.trainer import MAX_SKIPPED_IN_A_ROW

    unchanged: list[bool] = []
    _poison_gradients(monkeypatch, lambda it: it >= 3, unchanged)  # from the second epoch on
    epochs = MAX_SKIPPED_IN_A_ROW // 3 + 3
    with pytest.raises(
        TrainingError,
        match=rf"training diverged: {MAX_SKIPPED_IN_A_ROW} optimizer steps in a row "
        r"had non-finite gradients \(iteration 23, precision fp32.*"
        r"checkpoint_latest.pt holds the last finite weights",
    ):
        train(tiny_work, TrainConfig(epochs=epochs, final_validation=False, **FAST))
    assert unchanged == [True] * (MAX_SKIPPED_IN_A_ROW - 1)  # the last skipped step raised
    run = tiny_work / "runs" / "3d_fullres" / "unet" / "fold_0"
    latest = load_checkpoint(run / "checkpoint_latest.pt")
    assert latest["iteration"] % 3 == 0 and 3 <= latest["iteration"] < 3 + MAX_SKIPPED_IN_A_ROW
    assert all(torch.isfinite(v).all() for v in latest["model"].values() if v.is_floating_point())
    assert not (run / "checkpoint_final.pt").exists()
