"""A trainer's state: what its checkpoints hold, how a run continues from one, and ``progress.json``.

:class:`TrainerState` is a base of :class:`~medseg.training.trainer.Trainer`: :meth:`~TrainerState.state_dict`
is the checkpoint dict (``medseg-checkpoint-v1``: weights, optimizer and gradient-scaler state, schedule (with
the snapshots saved so far), progress counters, the clock's elapsed time and step time, the EMA and best
pseudo Dice, the epoch history, the weight average and the RNG states), :meth:`~TrainerState.load_state_dict` continues the
trainer from a loaded ``checkpoint_latest.pt`` (checkpoints of earlier versions included: entries they lack
keep their fresh values).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.clock import BudgetClock, EpochClock, TrainingClock
from medseg.distributed import DistContext
from medseg.errors import CheckpointError
from medseg.io.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
)
from medseg.io.workdir import RunDir
from medseg.planning.plan import Plan
from medseg.training.config import TrainConfig
from medseg.training.device import ThreadTuner
from medseg.training.distributed import unwrap
from medseg.training.progress import write_progress_files
from medseg.training.step_check import StepTimeCheck
from medseg.training.weight_averaging import WeightAverage

logger = logging.getLogger(__name__)


class TrainerState:
    """Checkpoint state and progress file of a :class:`~medseg.training.trainer.Trainer` (its base)."""

    cfg: TrainConfig
    plan: Plan
    clock: TrainingClock
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    weight_average: WeightAverage | None
    dist: DistContext
    run_dir: Path
    configuration: str
    arch: str
    lr0: float
    precision: str
    channels_last: bool
    num_threads: int
    num_workers: int
    thread_tuner: ThreadTuner
    step_check: StepTimeCheck | None
    epoch: int
    iteration: int
    best_metric: float | None
    ema_metric: float | None
    history: list[dict[str, Any]]
    snapshots_saved: int
    fwd_seconds_per_sample: float | None

    # ------------------------------------------------------------------ what the clock says
    @property
    def time_budget_seconds(self) -> float | None:
        """The run's time budget in seconds (None for an epoch-based run)."""
        return self.clock.budget_seconds if isinstance(self.clock, BudgetClock) else None

    @property
    def max_epochs(self) -> int | None:
        return self.clock.max_epochs if isinstance(self.clock, (BudgetClock, EpochClock)) else None

    def elapsed(self) -> float:
        """Seconds this run has spent, over all its sessions (each counted from its start)."""
        return self.clock.elapsed()

    def training_deadline(self) -> float | None:
        """Elapsed seconds at which training iterations must stop (time-budget runs), else None."""
        return self.clock.deadline()

    def progress(self) -> float:
        """Training progress in [0, 1] driving the learning-rate schedule."""
        return self.clock.progress(self.iteration)

    def state_dict(self, finished: bool = False) -> dict[str, Any]:
        """What a checkpoint holds: weights, optimizer, schedule, progress, clock, RNG states, settings, plan.

        Args:
            finished: whether training has ended (``checkpoint_final`` and the last ``checkpoint_latest``).

        Returns:
            A dict of tensors and builtins with :data:`medseg.io.checkpoint.REQUIRED_KEYS` (for
            :func:`medseg.io.checkpoint.save_checkpoint`); the layout of ``medseg-checkpoint-v1``.
        """
        clock = self.clock.state_dict()
        return {
            "format": CHECKPOINT_FORMAT,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "name": self.cfg.lr_schedule,
                "lr0": self.lr0,
                "progress": self.progress(),
                "snapshots_saved": self.snapshots_saved,
            },
            "grad_scaler": None if self.scaler is None else self.scaler.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "elapsed_seconds": clock["elapsed_seconds"],
            "rng": capture_rng_state(),
            "train_config": self.cfg.to_dict(),
            "plan": self.plan.to_dict(),
            "configuration": self.configuration,
            "arch": self.arch,
            "best_metric": self.best_metric,
            "ema_metric": self.ema_metric,
            "history": self.history,
            "finished": finished,
            "precision": self.precision,
            "timing": {"iter_seconds": clock["step_seconds"], "fwd_seconds_per_sample": self.fwd_seconds_per_sample},
            "weight_average": None if self.weight_average is None else self.weight_average.state_dict(),
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Continue from a loaded ``checkpoint_latest`` (inverse of :meth:`state_dict`; optional entries that
        older checkpoints lack -- timing, weight average, scaler, RNG -- keep their fresh values).

        Raises:
            CheckpointError: the weights or the optimizer state do not fit this trainer's network/optimizer.
        """
        where = RunDir(self.run_dir).checkpoint("latest")
        try:
            unwrap(self.model).load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(
                f"{where}: weights do not fit the {self.arch} network of the plan ({first})"
            ) from None
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{where}: optimizer state does not fit ({exc}); was the optimizer changed?"
            ) from None
        if self.scaler is not None and ckpt.get("grad_scaler"):
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.epoch = int(ckpt["epoch"])
        self.iteration = int(ckpt["iteration"])
        self.best_metric = ckpt.get("best_metric")
        self.ema_metric = ckpt.get("ema_metric")
        self.history = list(ckpt.get("history", []))
        self.snapshots_saved = int((ckpt.get("scheduler") or {}).get("snapshots_saved", 0))
        timing = ckpt.get("timing") or {}
        self.clock.load_state_dict(
            {"elapsed_seconds": ckpt.get("elapsed_seconds", 0.0), "step_seconds": timing.get("iter_seconds")}
        )
        self.fwd_seconds_per_sample = timing.get("fwd_seconds_per_sample")
        if self.weight_average is not None and ckpt.get("weight_average"):
            try:
                self.weight_average.load_state_dict(ckpt["weight_average"])
            except ValueError as exc:
                raise CheckpointError(f"{where}: {exc}") from None
        if "rng" in ckpt:
            restore_rng_state(ckpt["rng"])
        logger.info(
            "resuming %s at epoch %d, iteration %d (%.1f min trained)",
            self.run_dir,
            self.epoch,
            self.iteration,
            float(ckpt.get("elapsed_seconds", 0.0)) / 60,
        )

    def write_progress(self, status: str) -> None:
        if not self.dist.is_main:
            return
        deadline = self.training_deadline()
        write_progress_files(
            self.run_dir,
            {
                "status": status,
                "configuration": self.configuration,
                "arch": self.arch,
                "fold": self.cfg.fold,
                "epoch": self.epoch,
                "max_epochs": self.max_epochs,
                "iteration": self.iteration,
                "elapsed_seconds": round(self.elapsed(), 2),
                "time_budget_seconds": self.time_budget_seconds,
                "training_deadline_seconds": None if deadline is None else round(deadline, 2),
                "precision": self.precision,
                "channels_last": self.channels_last,
                "num_threads": self.num_threads,
                "threads_in_use": self.thread_tuner.current,
                "num_workers": self.num_workers,
                "world_size": self.dist.world_size,
                "best_ema_pseudo_dice": self.best_metric,
                "step_time_check": None if self.step_check is None else self.step_check.record(),
                "history": self.history,
            },
            f"{self.configuration}/{self.arch} {self.cfg.fold_name}",
        )

    def save(self, name: str, finished: bool = False) -> None:
        if self.dist.is_main:
            save_checkpoint(self.state_dict(finished=finished), RunDir(self.run_dir).checkpoint(name))

    def use_averaged_weights(self) -> None:
        """Put the weight average (``--weight-averaging ema``) into the network for ``checkpoint_final``."""
        wa = self.weight_average
        if wa is None:
            return
        if not wa.active:
            logger.info(
                "weight averaging had not started (progress < %.2f): checkpoint_final holds the last weights", wa.start
            )
            return
        wa.copy_to_model()
        logger.info(
            "checkpoint_final holds the weight average of the last %d steps (EMA over %.0f%% of the run)",
            wa.updates,
            100 * wa.horizon,
        )


__all__ = ["TrainerState"]
