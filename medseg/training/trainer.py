"""The training loop: one :class:`Trainer` per run folder.

Per iteration: fetch batch ``i`` (produced in the background), one optimizer step
(:class:`~medseg.training.step.OptimizerStep`) with the learning rate of the schedule at the clock's
progress. Per epoch: pseudo Dice on held-out patches (EMA -> ``checkpoint_best``), ``checkpoint_latest``,
log line, ``progress.json`` and ``training_curves.png``. At the end: ``checkpoint_final`` and the
sliding-window validation of the held-out cases (:mod:`medseg.training.validation`).

Time: the trainer asks its clock (:mod:`medseg.clock`) whether to stop, what progress drives the
learning-rate schedule and what time the final validation has; it does no deadline arithmetic itself.
Under a time budget the whole run (a refit of the plan, loading, training, per-epoch validation,
checkpoints and the final validation) fits the budget: before the first step the eval forward time of a
patch is measured and the final validation estimated from it (windows per case x TTA passes x forward
time, shortened to at most :data:`~medseg.training.validation_budget.MAX_VALIDATION_SHARE` of the budget);
that estimate and the last checkpoints are the clock's reserve; the per-epoch pseudo Dice is skipped when
it would cross the training deadline. The learning rate follows the schedule over elapsed training time,
so training always ends annealed.

State (:meth:`Trainer.state_dict` / :meth:`Trainer.load_state_dict`, the checkpoints, ``progress.json``) and
what the clock says (elapsed time, progress, deadline) are in :mod:`medseg.training.trainer_state`, pseudo Dice and the final validation's time in
:mod:`medseg.training.trainer_validation`, an epoch's iterations and its end (log line, checkpoints) in
:mod:`medseg.training.trainer_epoch`, the step in :mod:`medseg.training.step`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg import faults
from medseg.clock import BudgetClock, EpochClock, TrainingClock
from medseg.distributed import DistContext
from medseg.io.checkpoint import remove_stale_temporaries
from medseg.io.workdir import RunDir
from medseg.machine import autocast_dtype
from medseg.options import Precision
from medseg.planning.stage import Stage
from medseg.training.config import TrainConfig
from medseg.training.data import batch_iterator, load_training_cases, make_samplers
from medseg.training.device import checked_precision, planned_precision_and_layout, prepare_device
from medseg.training.distillation import DistillationLoss, attach_soft_targets
from medseg.training.distributed import unwrap
from medseg.training.progress import augmentation_summary
from medseg.training.run_record import RunRecord
from medseg.training.run_stage import run_plan
from medseg.training.step import (
    MAX_SKIPPED_IN_A_ROW,
    OptimizerStep,
    build_loss,
    build_model,
    build_optimizer,
)
from medseg.training.step_check import StepTimeCheck
from medseg.training.trainer_epoch import TrainerEpoch
from medseg.training.validation_budget import (
    FinalValidationEstimate,
    measure_forward_seconds,
)
from medseg.training.weight_averaging import WeightAverage

logger = logging.getLogger(__name__)

#: Epochs of an epoch-based run when neither the configuration nor a time budget says otherwise.
DEFAULT_EPOCHS = 1000
#: Share of a time budget the forward-time measurement before the first step may take.
MEASURE_SHARE = 0.01


# ---------------------------------------------------------------------- the trainer
class Trainer(TrainerEpoch):
    """Trains one network of one configuration on one fold; see the module docstring.

    Args:
        work_dir: the work folder (plans, preprocessed data, splits, runs).
        stage: what the run trains: the (validated) plan, configuration and architecture, before the run's
            own settings (:func:`~medseg.training.run_stage.run_plan`) are applied.
        cfg: resolved configuration (``configuration`` and ``arch`` set, naming ``stage``).
        run_dir: the run folder.
        dist_ctx: distributed context (single process by default).
        checkpoint: a loaded ``checkpoint_latest`` to continue from (:meth:`load_state_dict`), or None.
        train_ids / val_ids: the fold's training and held-out cases.
        started: ``time.perf_counter()`` when the command started (what came before the trainer, e.g. a
            budget refit, counts against a time budget); None = now.
        run_record: what the run did so far (its ``budget_fit`` and ``pretrained_report``); the trainer adds
            its ``precision_check`` (``self.run_record``).

    Raises:
        ConfigError: settings that do not fit the plan (e.g. ``class_weights``).
        CheckpointError: ``checkpoint`` does not fit the network or the optimizer.
    """

    def __init__(
        self,
        work_dir: Path,
        stage: Stage,
        cfg: TrainConfig,
        run_dir: Path,
        dist_ctx: DistContext,
        train_ids: list[str],
        val_ids: list[str],
        checkpoint: dict[str, Any] | None = None,
        started: float | None = None,
        run_record: RunRecord | None = None,
    ) -> None:
        started = time.perf_counter() if started is None else started
        self.work_dir, self.run_dir, self.cfg, self.dist = Path(work_dir), Path(run_dir), cfg, dist_ctx
        self.train_ids, self.val_ids = list(train_ids), list(val_ids)
        self.run_record = run_record if run_record is not None else RunRecord()
        assert (cfg.configuration, cfg.arch) == (stage.config_name, stage.arch)
        self.configuration, self.arch = stage.config_name, stage.arch

        # -------- device, threads, determinism
        self.device, self.num_workers, self.num_threads, self.thread_tuner = prepare_device(cfg, dist_ctx)

        # a time-budget plan records the precision and memory format it measured fastest on its device
        self.precision, self.channels_last = planned_precision_and_layout(cfg, stage, self.device)
        self.amp_dtype = autocast_dtype(self.precision)

        # -------- plan of the network actually trained (stored in every checkpoint)
        self.stage = stage = run_plan(stage, cfg)
        plan, net = stage.plan, stage.network
        self.plan, self.net_plan = plan, net
        self.patch_size = stage.patch_size
        self.dims = len(self.patch_size)
        self.batch_size = stage.batch_size
        self.batch_lo, self.batch_hi = dist_ctx.batch_slice(self.batch_size)
        self.local_batch = self.batch_hi - self.batch_lo
        if self.device.type == "cpu" and self.precision != "fp32":  # one step in a child process: does it crash?
            self.precision, check = checked_precision(
                self.precision,
                self.channels_last,
                dataclasses.replace(net, batch_size=self.local_batch),
                stage.in_channels,
                stage.num_classes,
                self.device,
                dist_ctx,
                cfg.seed,
            )
            self.amp_dtype = autocast_dtype(self.precision)
            fallback = check is not None and bool(check.get("fallback"))
            self.cfg = cfg = dataclasses.replace(cfg, precision=Precision.FP32 if fallback else cfg.precision)
            self.run_record = dataclasses.replace(self.run_record, precision_check=check)
        spacing = stage.spacing
        self.anisotropic = (
            self.dims == 3
            and max(spacing) / max(min(spacing[1:]), 1e-8) >= cfg.augmentation.anisotropy_threshold
            and spacing[0] == max(spacing)
        )

        # -------- data
        all_ids = sorted(set(self.train_ids) | set(self.val_ids))
        loaded = {c.case_id: c for c in load_training_cases(work_dir, stage, all_ids, progress=dist_ctx.is_main)}
        self.train_cases = [loaded[c] for c in self.train_ids]
        self.val_cases = [loaded[c] for c in self.val_ids]
        self.mirror_axes = stage.mirror_axes
        sampled, sampler_cfg = self.train_cases, cfg
        if cfg.distill is not None:  # the teachers' probabilities ride along as extra channels
            sampled = attach_soft_targets(work_dir, stage, self.train_cases, cfg.distill, str(self.device))
            sampler_cfg = dataclasses.replace(
                cfg, augmentation=dataclasses.replace(cfg.augmentation, previous_stage_perturbation=False)
            )
        self.sampler, self.val_sampler = make_samplers(
            sampled, self.val_cases or self.train_cases, stage, sampler_cfg, self.mirror_axes, self.anisotropic
        )

        # -------- model, loss, optimizer, step
        self.num_classes = stage.num_classes
        model, self.model = build_model(stage, self.device, self.channels_last, dist_ctx)
        self.loss_fn: nn.Module = build_loss(cfg, plan).to(self.device)
        if cfg.distill is not None:
            self.loss_fn = DistillationLoss(self.loss_fn, cfg.distill.weight, cfg.distill.temperature)
        self.optimizer = build_optimizer(model, cfg)
        self.lr0 = cfg.effective_lr
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step = OptimizerStep(
            self.model,
            self.loss_fn,
            self.optimizer,
            self.scaler,
            self.device,
            self.amp_dtype,
            dist_ctx,
            self.local_batch,
            self.batch_size,
            cfg.grad_clip,
            self.precision,
            RunDir(self.run_dir).checkpoint("latest"),
        )
        self.weight_average = WeightAverage(model) if cfg.resolved().weight_averaging == "ema" else None
        #: called with the iteration count after every completed iteration (a test fault, when armed)
        self.step_hooks: list[Callable[[int], None]] = []
        if faults.is_armed("train_step"):
            self.step_hooks.append(lambda iteration: faults.maybe_fail("train_step", str(iteration)))

        # -------- progress state and the clock
        self.epoch = 0
        self.iteration = 0
        self.best_metric: float | None = None
        self.ema_metric: float | None = None
        self.history: list[dict[str, Any]] = []
        self.snapshots_saved = 0  # checkpoint_snapshot_<i>.pt written (--snapshots)
        self.fwd_seconds_per_sample: float | None = None  # eval forward time of one patch
        self.end_epoch_seconds: float | None = None  # checkpoint + log + plot time at the end of an epoch
        self.pseudo_dice_seconds: float | None = None
        self.final_estimate = FinalValidationEstimate(
            {c.case_id: tuple(c.data.shape[1:]) for c in self.val_cases},
            self.patch_size,
            self.num_classes,
            self.mirror_axes,
            stage.total_stride,
            cfg.validation_tta,
        )
        self._param_count: int | None = None
        budget_fit = self.run_record.budget_fit
        self._warn_kept_plan = bool(budget_fit and not budget_fit.get("refit", True))
        self.step_check = StepTimeCheck.for_run(stage)
        self.clock: TrainingClock = self._make_clock(started)
        if checkpoint is not None:
            self.load_state_dict(checkpoint)

    # ------------------------------------------------------------------ the clock
    def _make_clock(self, started: float) -> TrainingClock:
        """A :class:`~medseg.clock.BudgetClock` under a time budget (its reserve: :meth:`_reserved_seconds`),
        else an :class:`~medseg.clock.EpochClock`."""
        if self.cfg.time_budget_minutes is not None:
            return BudgetClock(
                60.0 * self.cfg.time_budget_minutes, self._reserved_seconds, max_epochs=self.cfg.epochs, started=started
            )
        return EpochClock(
            self.cfg.epochs if self.cfg.epochs is not None else DEFAULT_EPOCHS,
            self.cfg.iters_per_epoch,
            started=started,
        )

    def training_done(self) -> bool:
        return self.clock.should_stop(self.epoch, self.iteration)

    def _measure_forward(self) -> None:
        """Measure the eval forward time of a patch before the first step and log the final validation it
        implies (a time-budgeted run reserves that validation)."""
        assert self.budget is not None
        self.fwd_seconds_per_sample = measure_forward_seconds(
            unwrap(self.model),
            self.stage.in_channels,
            self.patch_size,
            2 if self.dims == 3 else 8,
            self.device,
            self.amp_dtype,
            self.channels_last,
            max_seconds=self.budget.share(MEASURE_SHARE),
        )
        plan = self.final_validation_plan()
        if plan is not None:
            logger.info(
                "final validation estimated at %.0f s (%.3f s per patch forward)%s",
                plan.seconds,
                self.fwd_seconds_per_sample,
                f"; {plan.note()}" if plan.shortened else "",
            )

    # ------------------------------------------------------------------ main loop
    def fit(self) -> bool:
        """Train until the clock says stop (epochs or time budget used up); write checkpoints and logs.

        Returns:
            Whether any iteration was trained (False for a run that was already complete).
        """
        if self.dist.is_main:
            remove_stale_temporaries(self.run_dir)
        logger.info(
            "training %s/%s %s: %d train / %d held-out cases, patch %s, batch %d%s, %s, channels_last=%s, "
            "%d thread(s), %d data worker(s), %s, augmentation %s",
            self.configuration,
            self.arch,
            self.cfg.fold_name,
            len(self.train_cases),
            len(self.val_cases),
            list(self.patch_size),
            self.batch_size,
            f" ({self.local_batch} per rank x {self.dist.world_size})" if self.dist.enabled else "",
            self.precision,
            self.channels_last,
            self.num_threads,
            self.num_workers,
            f"time budget {self.cfg.time_budget_minutes:g} min"
            if self.budget is not None
            else f"{self.max_epochs} epochs x {self.cfg.iters_per_epoch} iterations",
            augmentation_summary(self.cfg.augmentation),
        )
        if self.training_done():
            logger.info(
                "training of %s is already complete (epoch %d); pass a larger --epochs or --time-budget to extend it",
                self.run_dir,
                self.epoch,
            )
            return False
        if (
            self.budget is not None
            and self.fwd_seconds_per_sample is None
            and self.dist.is_main
            and self.cfg.final_validation
            and self.val_cases
        ):
            self._measure_forward()  # the final validation is estimated (and reserved) before the first step
        stream = batch_iterator(self.sampler, self.iteration, self.batch_lo, self.batch_hi, self.num_workers)
        try:
            while not self.training_done():
                stats = self.train_epoch(stream)
                if stats["iterations"] == 0:
                    break
                skip_val = self._skip_pseudo_dice()
                t = time.perf_counter()
                val = {} if skip_val else self._pseudo_dice()
                if val:
                    self.pseudo_dice_seconds = time.perf_counter() - t
                self.epoch += 1
                t = time.perf_counter()
                self._end_epoch(stats, val)
                self.end_epoch_seconds = time.perf_counter() - t
        finally:
            close = getattr(stream, "_shutdown_workers", None)
            if close is not None:
                close()
        self.save_snapshots(None)  # the last cycle ends with the training
        self.write_progress("trained")
        return True


__all__ = ["DEFAULT_EPOCHS", "MAX_SKIPPED_IN_A_ROW", "Trainer"]
