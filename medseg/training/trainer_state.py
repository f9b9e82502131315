"""A :class:`~medseg.training.trainer.Trainer` as a checkpoint dict, and back: saving and resuming runs.

:func:`checkpoint_state` is what ``checkpoint_{latest,best,final}.pt`` hold (written with
:func:`medseg.io.checkpoint.save_checkpoint`); :func:`restore_state` continues a trainer from a loaded
``checkpoint_latest.pt``: weights, optimizer and gradient-scaler state, progress counters, the EMA and
best pseudo Dice, the epoch history, measured timings and the RNG states.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from medseg.errors import CheckpointError
from medseg.io.checkpoint import CHECKPOINT_FORMAT, capture_rng_state, restore_rng_state
from medseg.training.distributed import unwrap

if TYPE_CHECKING:
    from medseg.training.trainer import Trainer

logger = logging.getLogger(__name__)


def checkpoint_state(trainer: Trainer, finished: bool = False) -> dict[str, Any]:
    """The checkpoint dict of ``trainer``: weights, optimizer, schedule, progress, RNG states, settings, plan.

    Args:
        trainer: the run's trainer.
        finished: whether training has ended (``checkpoint_final`` and the last ``checkpoint_latest``).

    Returns:
        A dict of tensors and builtins with :data:`medseg.io.checkpoint.REQUIRED_KEYS` (for
        :func:`medseg.io.checkpoint.save_checkpoint`).
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "model": unwrap(trainer.model).state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": {"name": trainer.cfg.lr_schedule, "lr0": trainer.lr0, "progress": trainer.progress()},
        "grad_scaler": None if trainer.scaler is None else trainer.scaler.state_dict(),
        "epoch": trainer.epoch,
        "iteration": trainer.iteration,
        "elapsed_seconds": trainer.elapsed(),
        "rng": capture_rng_state(),
        "train_config": trainer.cfg.to_dict(),
        "plan": trainer.plan.to_dict(),
        "configuration": trainer.configuration,
        "arch": trainer.arch,
        "best_metric": trainer.best_metric,
        "ema_metric": trainer.ema_metric,
        "history": trainer.history,
        "finished": finished,
        "precision": trainer.precision,
        "timing": {"iter_seconds": trainer.iter_seconds, "fwd_seconds_per_sample": trainer.fwd_seconds_per_sample},
        "weight_average": None if trainer.weight_average is None else trainer.weight_average.state_dict(),
    }


def restore_state(trainer: Trainer, ckpt: dict[str, Any]) -> None:
    """Continue ``trainer`` from a loaded ``checkpoint_latest`` (inverse of :func:`checkpoint_state`).

    Args:
        trainer: a freshly built trainer of the same run.
        ckpt: the checkpoint dict (from :func:`medseg.io.checkpoint.load_checkpoint`).

    Raises:
        CheckpointError: the weights or the optimizer state do not fit the trainer's network/optimizer.
    """
    where = trainer.run_dir / "checkpoint_latest.pt"
    try:
        unwrap(trainer.model).load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{where}: weights do not fit the {trainer.arch} network of the plan ({first})") from None
    try:
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{where}: optimizer state does not fit ({exc}); was the optimizer changed?") from None
    if trainer.scaler is not None and ckpt.get("grad_scaler"):
        trainer.scaler.load_state_dict(ckpt["grad_scaler"])
    trainer.epoch = int(ckpt["epoch"])
    trainer.iteration = int(ckpt["iteration"])
    trainer.elapsed_before = float(ckpt.get("elapsed_seconds", 0.0))
    trainer.best_metric = ckpt.get("best_metric")
    trainer.ema_metric = ckpt.get("ema_metric")
    trainer.history = list(ckpt.get("history", []))
    timing = ckpt.get("timing") or {}
    trainer.iter_seconds = timing.get("iter_seconds")
    trainer.fwd_seconds_per_sample = timing.get("fwd_seconds_per_sample")
    if trainer.weight_average is not None and ckpt.get("weight_average"):
        try:
            trainer.weight_average.load_state_dict(ckpt["weight_average"])
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    if "rng" in ckpt:
        restore_rng_state(ckpt["rng"])
    logger.info("resuming %s at epoch %d, iteration %d (%.1f min trained)", trainer.run_dir, trainer.epoch,
                trainer.iteration, trainer.elapsed_before / 60)
