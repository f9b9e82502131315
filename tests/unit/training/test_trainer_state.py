"""Trainer.state_dict / load_state_dict: the checkpoint layout, and checkpoints written by earlier code resume."""

from __future__ import annotations

from medseg.io.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from medseg.training import TrainConfig, train

FAST = dict(
    iters_per_epoch=3, val_iters=1, num_workers=0, num_threads=1, precision="fp32", seed=3, final_validation=False
)

# the keys the checkpoint writer before the Trainer owned its state (trainer_state.checkpoint_state) wrote
OLD_KEYS = (
    "format",
    "model",
    "optimizer",
    "scheduler",
    "grad_scaler",
    "epoch",
    "iteration",
    "elapsed_seconds",
    "rng",
    "train_config",
    "plan",
    "configuration",
    "arch",
    "best_metric",
    "ema_metric",
    "history",
    "finished",
    "precision",
    "timing",
    "weight_average",
)


def _old_checkpoint(ckpt, *, minimal=False):
    """The dict the old ``checkpoint_state`` wrote, built key by key (``minimal``: without the optional
    entries that still older checkpoints lack)."""
    old = {
        "format": CHECKPOINT_FORMAT,
        "model": ckpt["model"],
        "optimizer": ckpt["optimizer"],
        "scheduler": {"name": "poly", "lr0": 0.01, "progress": ckpt["scheduler"]["progress"]},
        "grad_scaler": None,
        "epoch": 1,
        "iteration": 3,
        "elapsed_seconds": 123.5,
        "rng": ckpt["rng"],
        "train_config": ckpt["train_config"],
        "plan": ckpt["plan"],
        "configuration": "3d_fullres",
        "arch": "unet",
        "best_metric": 0.25,
        "ema_metric": 0.2,
        "history": [{"epoch": 1, "iteration": 3, "train_loss": 1.0, "lr": 0.01}],
        "finished": False,
        "precision": "fp32",
        "timing": {"iter_seconds": 0.5, "fwd_seconds_per_sample": 0.01},
        "weight_average": ckpt["weight_average"],
    }
    assert tuple(old) == OLD_KEYS
    if minimal:
        for key in ("grad_scaler", "rng", "timing", "weight_average", "best_metric", "ema_metric", "history"):
            del old[key]
    return old


def test_the_checkpoint_layout_is_unchanged(tiny_work):
    run = train(tiny_work, TrainConfig(epochs=1, **FAST))
    ckpt = load_checkpoint(run / "checkpoint_latest.pt")
    assert set(ckpt) == set(OLD_KEYS)
    assert ckpt["elapsed_seconds"] > 0 and ckpt["timing"]["iter_seconds"] > 0


def test_a_checkpoint_written_by_the_old_code_resumes(tiny_work):
    from medseg.training.trainer import Trainer

    run = train(tiny_work, TrainConfig(epochs=1, **FAST))
    fresh = load_checkpoint(run / "checkpoint_latest.pt")
    seen = {}
    original = Trainer.load_state_dict

    def spy(self, ckpt):
        original(self, ckpt)
        seen.update(
            epoch=self.epoch,
            iteration=self.iteration,
            elapsed=self.elapsed(),
            best=self.best_metric,
            step=self.clock.step_seconds,
            fwd=self.fwd_seconds_per_sample,
            history=len(self.history),
        )

    Trainer.load_state_dict = spy
    try:
        for minimal in (False, True):
            save_checkpoint(_old_checkpoint(fresh, minimal=minimal), run / "checkpoint_latest.pt")
            (run / "checkpoint_final.pt").unlink(missing_ok=True)
            train(tiny_work, TrainConfig(epochs=2, **FAST), resume=True)
            assert seen["epoch"] == 1 and seen["iteration"] == 3 and seen["elapsed"] >= 123.5
            if minimal:
                assert (seen["best"], seen["step"], seen["fwd"], seen["history"]) == (None, None, None, 0)
            else:
                assert (seen["best"], seen["step"], seen["fwd"], seen["history"]) == (0.25, 0.5, 0.01, 1)
            final = load_checkpoint(run / "checkpoint_final.pt")
            assert final["epoch"] == 2 and final["iteration"] == 6 and final["elapsed_seconds"] >= 123.5
            assert final["best_metric"] is not None
    finally:
        Trainer.load_state_dict = original
