"""The training loop: one :class:`Trainer` per run folder.

Per iteration: fetch batch ``i`` (produced in the background), forward under autocast, deep-supervised
Dice + CE loss in float32, backward (gradient scaling for CUDA fp16), gradient clipping, optimizer step
with the learning rate of the schedule at the current progress. Per epoch: pseudo Dice on held-out
patches (EMA -> ``checkpoint_best``), ``checkpoint_latest``, log line, ``progress.json`` and
``training_curves.png``. At the end: ``checkpoint_final`` and the sliding-window validation of the
held-out cases (:mod:`medseg.training.validation`).

Time budgets: the whole run (a refit of the plan, loading, training, per-epoch validation, checkpoints and
the final validation) fits the budget. Before the first step the eval forward time of a patch is
measured; the final validation is estimated from it (windows per case x TTA passes x forward time),
shortened to at most :data:`~medseg.training.validation_budget.MAX_VALIDATION_SHARE` of the budget, and
reserved; the per-epoch pseudo Dice is skipped when it would cross the training deadline. The learning
rate follows the schedule over elapsed training time, so training always ends annealed.

Device, precision and thread defaults live in :mod:`medseg.training.device`, the checkpoint state in
:mod:`medseg.training.trainer_state`, pseudo Dice in :mod:`medseg.training.validation`, the final-validation
estimate in :mod:`medseg.training.validation_budget`, ``progress.json`` and the curves in
:mod:`medseg.training.progress`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from medseg.errors import ConfigError, TrainingError
from medseg.faults import maybe_fail
from medseg.io.checkpoint import remove_stale_temporaries, save_checkpoint
from medseg.machine import keep_freed_cpu_memory
from medseg.planning.plan import Plan
from medseg.training.config import AugmentationConfig, TrainConfig, run_plan
from medseg.training.data import PatchSampler, batch_iterator, load_training_cases
from medseg.training.device import (
    ThreadTuner,
    autocast,
    autocast_dtype,
    channels_last_format,
    planned_precision_and_layout,
    resolve_device,
    to_device,
    workers_and_threads,
)
from medseg.training.distributed import DistContext, unwrap
from medseg.training.losses import DeepSupervisionLoss, DiceCELoss
from medseg.training.progress import write_progress_files
from medseg.training.region_losses import region_loss
from medseg.training.schedule import lr_factor
from medseg.training.step_check import StepTimeCheck
from medseg.training.trainer_state import checkpoint_state, restore_state
from medseg.training.weight_averaging import WeightAverage
from medseg.training.validation import pseudo_dice
from medseg.training.validation_budget import (
    MAX_VALIDATION_SHARE,
    ValidationBudget,
    ValidationPlan,
    measure_forward_seconds,
    plan_validation,
)

logger = logging.getLogger(__name__)

#: Epochs of an epoch-based run when neither the configuration nor a time budget says otherwise.
DEFAULT_EPOCHS = 1000
MAX_SKIPPED_IN_A_ROW = 20  # optimizer steps with non-finite gradients before training stops (diverged)


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """Trains one network of one configuration on one fold; see the module docstring.

    Args:
        work_dir: the work folder (plans, preprocessed data, splits, runs).
        plan: the plan (already validated).
        cfg: resolved configuration (``configuration`` and ``arch`` set).
        run_dir: the run folder.
        dist_ctx: distributed context (single process by default).
        checkpoint: a loaded ``checkpoint_latest`` to continue from, or None for a fresh run.
        train_ids / val_ids: the fold's training and held-out cases.
        started: ``time.perf_counter()`` when the command started (what came before the trainer, e.g. a
            budget refit, counts against a time budget); None = now.
    """

    def __init__(self, work_dir: Path, plan: Plan, cfg: TrainConfig, run_dir: Path, dist_ctx: DistContext,
                 train_ids: list[str], val_ids: list[str], checkpoint: dict[str, Any] | None = None,
                 started: float | None = None) -> None:
        self.session_start = time.perf_counter() if started is None else started
        self.work_dir, self.run_dir, self.cfg, self.dist = Path(work_dir), Path(run_dir), cfg, dist_ctx
        self.train_ids, self.val_ids = list(train_ids), list(val_ids)
        assert cfg.configuration is not None and cfg.arch is not None
        self.configuration, self.arch = cfg.configuration, cfg.arch

        # -------- device, threads, determinism
        self.device = resolve_device(cfg.device, dist_ctx)
        self.num_workers, self.num_threads = workers_and_threads(cfg, self.device, dist_ctx.world_size)
        if self.device.type == "cpu":
            keep_freed_cpu_memory()  # activations reuse freed memory instead of faulting in fresh pages
        self.thread_tuner = ThreadTuner(self.num_threads, enabled=cfg.num_threads is None and not cfg.deterministic
                                        and self.device.type == "cpu" and not dist_ctx.enabled)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)

        # a time-budget plan records the precision and memory format it measured fastest on its device
        self.precision, self.channels_last = planned_precision_and_layout(cfg, plan, self.configuration, self.arch,
                                                                          self.device)
        self.amp_dtype = autocast_dtype(self.precision)

        # -------- plan of the network actually trained (stored in every checkpoint)
        plan, net = run_plan(plan, cfg, self.configuration, self.arch)
        cfg_plan = plan.configuration(self.configuration)
        self.plan, self.net_plan = plan, net
        self.patch_size = tuple(net.patch_size)
        self.dims = len(self.patch_size)
        self.batch_size = net.batch_size
        self.batch_lo, self.batch_hi = dist_ctx.batch_slice(self.batch_size)
        self.local_batch = self.batch_hi - self.batch_lo
        if self.device.type == "cpu" and self.precision != "fp32":  # one step in a child process: does it crash?
            from medseg.training.device import checked_precision

            self.precision, check = checked_precision(
                self.precision, self.channels_last, dataclasses.replace(net, batch_size=self.local_batch),
                plan.network_in_channels(self.configuration), plan.num_classes, self.device, dist_ctx, cfg.seed)
            self.amp_dtype = autocast_dtype(self.precision)
            fallback = {"precision": "fp32"} if check is not None and check.get("fallback") else {}
            self.cfg = cfg = dataclasses.replace(cfg, precision_check=check, **fallback)
        spacing = cfg_plan.spacing
        self.anisotropic = self.dims == 3 and max(spacing) / max(min(spacing[1:]), 1e-8) >= cfg.augmentation.anisotropy_threshold \
            and spacing[0] == max(spacing)

        # -------- data
        all_ids = sorted(set(self.train_ids) | set(self.val_ids))
        loaded = {c.case_id: c for c in load_training_cases(work_dir, plan, self.configuration, all_ids,
                                                            progress=dist_ctx.is_main)}
        self.train_cases = [loaded[c] for c in self.train_ids]
        self.val_cases = [loaded[c] for c in self.val_ids]
        self.mirror_axes = cfg_plan.resolved_mirror_axes()
        augmentation = dataclasses.replace(cfg.augmentation, mirror_axes=self.mirror_axes)
        self.sampler = PatchSampler(self.train_cases, self.patch_size, self.batch_size, cfg.foreground_oversample,
                                    augmentation, seed=cfg.seed, anisotropic=self.anisotropic,
                                    image_channels=plan.num_channels)
        pseudo_cases = self.val_cases or self.train_cases
        self.val_sampler = PatchSampler(pseudo_cases, self.patch_size, self.batch_size, cfg.foreground_oversample,
                                        None, seed=cfg.seed + 1, anisotropic=self.anisotropic)

        # -------- model, loss, optimizer
        self.num_classes = plan.num_classes
        model = net.build(plan.network_in_channels(self.configuration), self.num_classes).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=channels_last_format(self.dims))
        self.model: nn.Module = model
        if dist_ctx.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        loss_options = dict(
            dice_weight=cfg.dice_weight, ce_weight=cfg.ce_weight, batch_dice=cfg.batch_dice, smooth=cfg.dice_smooth,
            class_weights=cfg.class_weights, label_smoothing=cfg.label_smoothing, focal_gamma=cfg.focal_gamma,
            ignore_index=plan.ignore_class,
        )
        base_loss = region_loss(plan.region_classes, **loss_options) if plan.is_region_based \
            else DiceCELoss(**loss_options)  # type: ignore[arg-type]
        self.loss_fn = DeepSupervisionLoss(base_loss).to(self.device)
        if cfg.class_weights is not None and len(cfg.class_weights) != self.num_classes:
            raise ConfigError(f"class_weights has {len(cfg.class_weights)} values but the plan has {self.num_classes} classes")
        opt = cfg.resolved()
        self.lr0 = float(opt.lr)
        if opt.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                model.parameters(), lr=self.lr0, momentum=opt.momentum, nesterov=cfg.nesterov and opt.momentum > 0,
                weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr0, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.skipped_steps = 0  # optimizer steps skipped for non-finite gradients, this session
        self._skipped_in_a_row = 0
        self.weight_average = WeightAverage(model) if opt.weight_averaging == "ema" else None

        # -------- progress state
        self.epoch = 0
        self.iteration = 0
        self.elapsed_before = 0.0
        self.best_metric: float | None = None
        self.ema_metric: float | None = None
        self.history: list[dict[str, Any]] = []
        self.iter_seconds: float | None = None  # smoothed duration of one training iteration
        self.fwd_seconds_per_sample: float | None = None  # eval forward time of one patch
        self.end_epoch_seconds: float | None = None  # checkpoint + log + plot time at the end of an epoch
        self.pseudo_dice_seconds: float | None = None
        self._progress_floor = 0.0  # time-budget progress reached in this session
        self._validation_plan: tuple[tuple[float, float | None], ValidationPlan | None] | None = None
        self._param_count: int | None = None
        self._warn_kept_plan = bool(cfg.budget_fit) and not cfg.budget_fit.get("refit", True)
        self.step_check = StepTimeCheck.for_run(plan, self.configuration, self.arch, net)
        if checkpoint is not None:
            restore_state(self, checkpoint)

    # ------------------------------------------------------------------ state
    @property
    def time_budget_seconds(self) -> float | None:
        m = self.cfg.time_budget_minutes
        return None if m is None else 60.0 * m

    @property
    def max_epochs(self) -> int | None:
        if self.cfg.epochs is not None:
            return self.cfg.epochs
        return None if self.time_budget_seconds is not None else DEFAULT_EPOCHS

    def elapsed(self) -> float:
        """Seconds this run has spent, over all its sessions (each counted from its start)."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    # ------------------------------------------------------------------ schedule and budget
    def _seconds_per_window(self) -> float:
        """Eval forward seconds of one patch: measured, or half a training step per sample when that is less
        (a training step is forward + backward; the measured forward errs slow while the network is new)."""
        from_steps = None if self.iter_seconds is None else self.iter_seconds / max(1, self.local_batch) / 2.0
        if self.fwd_seconds_per_sample is None:
            return from_steps if from_steps is not None else 1.0 / 3.0
        return self.fwd_seconds_per_sample if from_steps is None else min(self.fwd_seconds_per_sample, from_steps)

    def final_validation_plan(self) -> ValidationPlan | None:
        """The final validation this run expects to run (None when there is none): under a time budget the
        one that fits :data:`MAX_VALIDATION_SHARE` of it (:func:`plan_validation`)."""
        if not (self.cfg.final_validation and self.val_cases):
            return None
        budget = self.time_budget_seconds
        key = (self._seconds_per_window(), None if budget is None else MAX_VALIDATION_SHARE * budget)
        if self._validation_plan is None or self._validation_plan[0] != key:
            shapes = {c.case_id: tuple(c.data.shape[1:]) for c in self.val_cases}
            plan = plan_validation(shapes, self.patch_size, self.num_classes, key[0], mirror_axes=self.mirror_axes,
                                   total_stride=self.net_plan.total_stride(), use_tta=self.cfg.validation_tta,
                                   limit=key[1])
            self._validation_plan = (key, plan)
        return self._validation_plan[1]

    def final_validation_estimate(self) -> float:
        """Seconds the final sliding-window validation is expected to take (0 when there is none)."""
        plan = self.final_validation_plan()
        return 0.0 if plan is None else plan.seconds

    def validation_budget(self) -> ValidationBudget | None:
        """The time the final validation has (until the budget ends, less a small margin), or None."""
        budget = self.time_budget_seconds
        if budget is None:
            return None
        left = budget - self.elapsed() - min(2.0, 0.01 * budget)
        shapes = {c.case_id: tuple(c.data.shape[1:]) for c in self.val_cases}
        return ValidationBudget(time.perf_counter() + max(left, 0.0), self._seconds_per_window(), shapes)

    def _checkpoint_seconds(self) -> float:
        """Seconds of writing one checkpoint: measured at the epoch ends, else from the model's size."""
        if self.end_epoch_seconds is not None:
            return self.end_epoch_seconds
        if self._param_count is None:
            self._param_count = sum(p.numel() for p in self.model.parameters())
        return 0.5 + self._param_count * 4 * 3 / 100e6  # weights and two optimizer moments at ~100 MB/s

    def training_deadline(self) -> float | None:
        """Elapsed seconds at which training iterations must stop (time-budget runs), else None."""
        budget = self.time_budget_seconds
        if budget is None:
            return None
        reserve = self.final_validation_estimate()
        # the last epoch's bookkeeping and the final checkpoints come after the last iteration
        bookkeeping = 2.0 * self._checkpoint_seconds()
        margin = min(30.0, 0.02 * budget)
        return max(budget - reserve - bookkeeping - margin, 0.0)

    def progress(self) -> float:
        """Training progress in [0, 1] driving the learning-rate schedule."""
        deadline = self.training_deadline()
        if deadline is not None:
            # the deadline moves a little as the time estimates improve; never let the schedule go back
            p = min(1.0, self.elapsed() / deadline) if deadline > 0 else 1.0
            self._progress_floor = max(self._progress_floor, p)
            return self._progress_floor
        total = (self.max_epochs or DEFAULT_EPOCHS) * self.cfg.iters_per_epoch
        return min(1.0, self.iteration / total)

    def training_done(self) -> bool:
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            return True
        deadline = self.training_deadline()
        if deadline is not None:
            return self.elapsed() + (self.iter_seconds or 0.0) >= deadline
        return False

    def _set_lr(self, progress: float) -> float:
        lr = self.lr0 * lr_factor(self.cfg.lr_schedule, progress, self.cfg.poly_power, self.cfg.cosine_cycles)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # ------------------------------------------------------------------ steps
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on a batch; returns the loss (mean over this rank's samples)."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            outputs = self.model(x)
        loss = self.loss_fn(outputs, y)
        # DDP averages gradients over ranks; weight by the rank's share so uneven splits stay exact
        scale = self.local_batch * self.dist.world_size / self.batch_size
        scaled = loss * scale if scale != 1 else loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            scaled.backward()
        norm = self._grad_norm()
        if self.scaler is not None:  # the scaler skips steps with inf/NaN gradients itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif torch.isfinite(norm):
            self.optimizer.step()
            self._skipped_in_a_row = 0
        else:
            self._skip_step(float(norm))
        return float(loss.detach())

    def _grad_norm(self) -> torch.Tensor:
        """The gradients' global L2 norm, after clipping them to ``grad_clip`` when it is positive."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            return nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if not params:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))

    def _skip_step(self, norm: float) -> None:
        """Leave the weights untouched after a step with non-finite gradients (one bad batch, a numerical
        overflow) instead of writing NaN into every weight; stop after MAX_SKIPPED_IN_A_ROW such steps in a row.

        Raises:
            TrainingError: the training diverged (the weights of checkpoint_latest are still finite).
        """
        self.skipped_steps += 1
        self._skipped_in_a_row += 1
        logger.warning("iteration %d: gradient norm %s, the optimizer step was skipped (%d skipped so far)",
                       self.iteration + 1, norm, self.skipped_steps)
        if self._skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            hint = " or train with --precision fp32" if self.precision != "fp32" else ""
            raise TrainingError(
                f"training diverged: {self._skipped_in_a_row} optimizer steps in a row had non-finite gradients "
                f"(iteration {self.iteration + 1}, precision {self.precision}, learning rate "
                f"{self.optimizer.param_groups[0]['lr']:.3g}); {self.run_dir / 'checkpoint_latest.pt'} holds the "
                f"last finite weights: lower the learning rate{hint}")

    def _sync_stop_and_progress(self) -> tuple[bool, float]:
        """Rank 0's decision whether to stop and its progress, on every rank."""
        stop = self.training_done()
        progress = self.progress()
        if self.dist.enabled and self.time_budget_seconds is not None:
            t = torch.tensor([1.0 if stop else 0.0, progress], dtype=torch.float64)
            self.dist.broadcast(t)
            stop, progress = bool(t[0] > 0.5), float(t[1])
        return stop, progress

    def train_epoch(self, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        """Up to ``iters_per_epoch`` iterations (fewer when the time budget ends)."""
        self.model.train()
        n = 0
        loss_sum = 0.0
        wait = 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        t_start = time.perf_counter()
        bar = tqdm(total=self.cfg.iters_per_epoch, desc=f"epoch {self.epoch}", unit="it", leave=False,
                   disable=not self.dist.is_main, dynamic_ncols=True)
        try:
            for _ in range(self.cfg.iters_per_epoch):
                stop, progress = self._sync_stop_and_progress()
                if stop and self.time_budget_seconds is not None:
                    break
                lr = self._set_lr(progress)
                t0 = time.perf_counter()
                x, y = next(stream)
                t1 = time.perf_counter()
                wait += t1 - t0
                x, y = to_device(x, y, self.device, self.channels_last)
                self.thread_tuner.before_step()
                t_step = time.perf_counter()
                loss = self.train_step(x, y)
                self.thread_tuner.after_step(time.perf_counter() - t_step)
                if self.step_check is not None and self.dist.is_main:
                    self.step_check.add(time.perf_counter() - t_step)
                if self.weight_average is not None:
                    self.weight_average.update(progress)
                if not math.isfinite(loss):
                    logger.warning("iteration %d: non-finite loss %s", self.iteration, loss)
                loss_sum += loss
                n += 1
                self.iteration += 1
                dt = time.perf_counter() - t0
                self.iter_seconds = dt if self.iter_seconds is None else 0.9 * self.iter_seconds + 0.1 * dt
                if self._warn_kept_plan:
                    self._warn_about_kept_plan(dt)
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                maybe_fail("train_step", str(self.iteration))
        finally:
            bar.close()
        seconds = time.perf_counter() - t_start
        stats = torch.tensor([loss_sum * self.local_batch, float(n * self.local_batch)], dtype=torch.float64)
        self.dist.all_reduce_sum(stats)
        mean_loss = float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")
        return {"iterations": n, "train_loss": mean_loss, "lr": lr, "epoch_seconds": seconds,
                "data_wait_seconds": wait, "it_per_s": n / seconds if seconds > 0 else 0.0}

    def use_averaged_weights(self) -> None:
        """Put the weight average (``--weight-averaging ema``) into the network for ``checkpoint_final``."""
        wa = self.weight_average
        if wa is None:
            return
        if not wa.active:
            logger.info("weight averaging had not started (progress < %.2f): checkpoint_final holds the last "
                        "weights", wa.start)
            return
        wa.copy_to_model()
        logger.info("checkpoint_final holds the weight average of the last %d steps (EMA over %.0f%% of the run)",
                    wa.updates, 100 * wa.horizon)

    def _pseudo_dice(self) -> dict[str, Any]:
        """This epoch's pseudo Dice on ``val_iters`` held-out batches (:func:`~medseg.training.validation.pseudo_dice`)."""
        first = self.epoch * self.cfg.val_iters
        val, per_sample = pseudo_dice(unwrap(self.model), self.val_sampler, range(first, first + self.cfg.val_iters),
                                      self.batch_lo, self.batch_hi, self.num_classes, self.dist, device=self.device,
                                      amp_dtype=self.amp_dtype, channels_last=self.channels_last,
                                      regions=self.plan.region_classes, ignore_index=self.plan.ignore_class)
        if per_sample is not None:
            old = self.fwd_seconds_per_sample
            self.fwd_seconds_per_sample = per_sample if old is None else 0.5 * (old + per_sample)
        return val

    def _warn_about_kept_plan(self, step_seconds: float) -> None:
        """One warning, after the first step, for a plan kept although it is not fitted to the budget."""
        self._warn_kept_plan = False
        deadline = self.training_deadline() or 0.0
        expected = self.iteration + max(0, int((deadline - self.elapsed()) / max(step_seconds, 1e-9)))
        fit = self.cfg.budget_fit or {}
        logger.warning("%s (kept: %s): one training step takes %.1f s, so about %d iterations fit in the %g-minute "
                       "budget", fit.get("reason", "the plan is not fitted to the time budget"), fit.get("kept_by"),
                       step_seconds, expected, self.cfg.time_budget_minutes)

    # ------------------------------------------------------------------ outputs
    def write_progress(self, status: str) -> None:
        if not self.dist.is_main:
            return
        deadline = self.training_deadline()
        write_progress_files(self.run_dir, {
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
        }, f"{self.configuration}/{self.arch} {self.cfg.fold_name}")

    def save(self, name: str, finished: bool = False) -> None:
        if self.dist.is_main:
            save_checkpoint(checkpoint_state(self, finished=finished), self.run_dir / f"checkpoint_{name}.pt")

    # ------------------------------------------------------------------ main loop
    def fit(self) -> bool:
        """Train until the epochs or the time budget are used up; write checkpoints and logs.

        Returns:
            Whether any iteration was trained (False for a run that was already complete).
        """
        if self.dist.is_main:
            remove_stale_temporaries(self.run_dir)
        logger.info(
            "training %s/%s %s: %d train / %d held-out cases, patch %s, batch %d%s, %s, channels_last=%s, "
            "%d thread(s), %d data worker(s), %s, augmentation %s",
            self.configuration, self.arch, self.cfg.fold_name, len(self.train_cases), len(self.val_cases),
            list(self.patch_size), self.batch_size,
            f" ({self.local_batch} per rank x {self.dist.world_size})" if self.dist.enabled else "",
            self.precision, self.channels_last, self.num_threads, self.num_workers,
            f"time budget {self.cfg.time_budget_minutes:g} min" if self.time_budget_seconds is not None
            else f"{self.max_epochs} epochs x {self.cfg.iters_per_epoch} iterations",
            _augmentation_summary(self.cfg.augmentation),
        )
        if self.training_done():
            logger.info("training of %s is already complete (epoch %d); pass a larger --epochs or "
                        "--time-budget to extend it", self.run_dir, self.epoch)
            return False
        if (self.time_budget_seconds is not None and self.fwd_seconds_per_sample is None and self.dist.is_main
                and self.cfg.final_validation and self.val_cases):
            # the final validation is estimated (and reserved) from the forward time before the first step
            self.fwd_seconds_per_sample = measure_forward_seconds(
                unwrap(self.model), self.plan.network_in_channels(self.configuration), self.patch_size, 2 if self.dims == 3 else 8, self.device,
                self.amp_dtype, self.channels_last, max_seconds=0.01 * self.time_budget_seconds)
            plan = self.final_validation_plan()
            if plan is not None:
                logger.info("final validation estimated at %.0f s (%.3f s per patch forward)%s", plan.seconds,
                            self.fwd_seconds_per_sample, f"; {plan.note()}" if plan.shortened else "")
        stream = batch_iterator(self.sampler, self.iteration, self.batch_lo, self.batch_hi, self.num_workers)
        try:
            while not self.training_done():
                stats = self.train_epoch(stream)
                if stats["iterations"] == 0:
                    break
                deadline = self.training_deadline()
                pd_seconds = self.pseudo_dice_seconds
                if pd_seconds is None:  # not measured yet: estimate from the forward time
                    pd_seconds = 1.5 * self.cfg.val_iters * self.local_batch * self._seconds_per_window()
                skip_val = deadline is not None and (
                    self.training_done() or self.elapsed() + pd_seconds > deadline)
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
        self.write_progress("trained")
        return True

    def _end_epoch(self, stats: dict[str, Any], val: dict[str, Any]) -> None:
        entry: dict[str, Any] = {"epoch": self.epoch, "iteration": self.iteration, **stats}
        improved = False
        if val and not math.isnan(val["val_dice"]):
            d = val["val_dice"]
            a = self.cfg.ema_alpha
            self.ema_metric = d if self.ema_metric is None else a * self.ema_metric + (1 - a) * d
            entry.update(val)
            entry["ema_dice"] = self.ema_metric
            if self.best_metric is None or self.ema_metric > self.best_metric:
                self.best_metric = self.ema_metric
                improved = True
        entry["elapsed_seconds"] = self.elapsed()
        self.history.append(entry)
        per_class = ""
        if val.get("dice_per_class"):
            per_class = " [" + ", ".join("-" if v is None else f"{v:.3f}" for v in val["dice_per_class"]) + "]"
        logger.info(
            "epoch %d: loss %.4f, pseudo Dice %s (EMA %s)%s, lr %.2e, %.1f it/s, %.0f s (data wait %.1f s), "
            "elapsed %.1f min",
            self.epoch, stats["train_loss"], f"{val['val_dice']:.4f}" if val else "-",
            f"{self.ema_metric:.4f}" if self.ema_metric is not None else "-", per_class, stats["lr"],
            stats["it_per_s"], stats["epoch_seconds"], stats["data_wait_seconds"], self.elapsed() / 60,
        )
        if improved:
            self.save("best")
            logger.info("new best EMA pseudo Dice %.4f -> checkpoint_best.pt", self.best_metric)
        self.save("latest")
        self.write_progress("training")


def _augmentation_summary(aug: AugmentationConfig) -> str:
    """``off``, ``spatial + mirroring`` or ``spatial + mirroring + intensity`` (for the start-of-run log)."""
    if not aug.enabled:
        return "off"
    return "spatial + mirroring" + ("" if aug.intensity is False else " + intensity")
