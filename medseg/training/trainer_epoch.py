"""A trainer's epoch: its iterations, and what happens at its end.

:class:`TrainerEpoch` is the base of :class:`~medseg.training.trainer.Trainer` that runs the training loop's
body, building on its state (:class:`~medseg.training.trainer_state.TrainerState`: checkpoints,
``progress.json``, what the clock says) and its validation hook
(:class:`~medseg.training.trainer_validation.TrainerValidation`: pseudo Dice, the kept-plan warning).

Per iteration (:meth:`TrainerEpoch.train_epoch`): rank 0's decision whether the clock stops the run, the
learning rate of the schedule at the clock's progress, the next batch of the stream, one optimizer step
(:class:`~medseg.training.step.OptimizerStep`), the weight average, the clock's step time, the step hooks.
With ``snapshots``, the weights when a cosine cycle has ended (:meth:`TrainerEpoch.save_snapshots`,
``checkpoint_snapshot_<i>.pt``). At the end of an epoch (:meth:`TrainerEpoch._end_epoch`): the EMA of the
pseudo Dice, the history entry, the epoch's log line, ``checkpoint_best`` when the EMA improved,
``checkpoint_latest`` and ``progress.json``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from medseg.io.workdir import RunDir
from medseg.progress import progress_bar
from medseg.training.device import to_device
from medseg.training.distillation import split_soft_targets
from medseg.training.progress import epoch_line
from medseg.training.schedule import completed_cycles, lr_factor
from medseg.training.step import OptimizerStep
from medseg.training.trainer_state import TrainerState
from medseg.training.trainer_validation import TrainerValidation

# The epoch lines are the trainer's log: they keep its logger name, which tools and the fault catalogue
# (tests/faults/catalogue.py reads "medseg.training.trainer: epoch N: loss ...") look for.
logger = logging.getLogger("medseg.training.trainer")


class TrainerEpoch(TrainerState, TrainerValidation):
    """The epoch loop of a :class:`~medseg.training.trainer.Trainer` (its base); see the module docstring."""

    step: OptimizerStep
    step_hooks: list[Callable[[int], None]]
    snapshots_saved: int

    # ------------------------------------------------------------------ steps
    def _set_lr(self, progress: float) -> float:
        cfg = self.cfg
        lr = self.lr0 * lr_factor(cfg.lr_schedule, progress, cfg.poly_power, cfg.cosine_cycles, cfg.cosine_cycle_growth)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on a batch (:class:`~medseg.training.step.OptimizerStep`); returns the loss.
        A distillation batch's teacher channels are split off into the target first."""
        if self.cfg.distill is not None:
            x, target = split_soft_targets(x, y, self.plan.num_channels)
            return self.step(x, target, self.iteration)
        return self.step(x, y, self.iteration)

    def _sync_stop_and_progress(self) -> tuple[bool, float]:
        """Rank 0's decision whether to stop and its progress, on every rank."""
        stop = self.training_done()
        progress = self.progress()
        if self.dist.enabled and self.clock.stops_mid_epoch:
            t = torch.tensor([1.0 if stop else 0.0, progress], dtype=torch.float64)
            self.dist.broadcast(t)
            stop, progress = bool(t[0] > 0.5), float(t[1])
        return stop, progress

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        """Up to ``iters_per_epoch`` iterations (fewer when the clock stops the run mid-epoch)."""
        self.model.train()
        n = 0
        loss_sum = 0.0
        wait = 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        t_start = time.perf_counter()
        bar = progress_bar(
            total=self.cfg.iters_per_epoch,
            desc=f"epoch {self.epoch}",
            unit="it",
            leave=False,
            disable=not self.dist.is_main,
            dynamic_ncols=True,
        )
        try:
            for _ in range(self.cfg.iters_per_epoch):
                stop, progress = self._sync_stop_and_progress()
                if stop and self.clock.stops_mid_epoch:
                    break
                self.save_snapshots(progress)
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
                self.clock.step_done(dt)
                if self._warn_kept_plan:
                    self._warn_about_kept_plan(dt)
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                for hook in self.step_hooks:
                    hook(self.iteration)
        finally:
            bar.close()
        seconds = time.perf_counter() - t_start
        stats = torch.tensor([loss_sum * self.local_batch, float(n * self.local_batch)], dtype=torch.float64)
        self.dist.all_reduce_sum(stats)
        mean_loss = float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")
        return {
            "iterations": n,
            "train_loss": mean_loss,
            "lr": lr,
            "epoch_seconds": seconds,
            "data_wait_seconds": wait,
            "it_per_s": n / seconds if seconds > 0 else 0.0,
        }

    def save_snapshots(self, progress: float | None) -> None:
        """With ``snapshots``: save the weights as ``checkpoint_snapshot_<i>.pt`` for each cosine cycle ``i`` that
        has ended since the last one saved, before the step at ``progress`` (None: training has ended, and with
        it the last cycle). The weights are those after the last step of the cycle, at a learning rate near 0."""
        cfg = self.cfg
        if not cfg.snapshots:
            return
        ended = cfg.cosine_cycles
        if progress is not None:  # the last cycle ends with the training, not at a progress value
            ended = min(completed_cycles(progress, cfg.cosine_cycles, cfg.cosine_cycle_growth), cfg.cosine_cycles - 1)
        while self.snapshots_saved < ended:
            self.snapshots_saved += 1
            self.save(RunDir.snapshot_name(self.snapshots_saved))
            logger.info(
                "cycle %d of %d ended at iteration %d -> %s",
                self.snapshots_saved,
                self.cfg.cosine_cycles,
                self.iteration,
                RunDir.checkpoint_file(RunDir.snapshot_name(self.snapshots_saved)),
            )

    def _end_epoch(self, stats: dict[str, Any], val: dict[str, Any]) -> None:
        """Book an epoch that just ended (``self.epoch`` already counts it): EMA of the pseudo Dice, history
        entry, log line, ``checkpoint_best`` (when the EMA improved), ``checkpoint_latest``, ``progress.json``.

        Args:
            stats: what :meth:`train_epoch` returned.
            val: the epoch's pseudo Dice (``val_dice``, ``dice_per_class``); empty when it was skipped.
        """
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
        logger.info("%s", epoch_line(entry, val, self.ema_metric))
        if improved:
            self.save("best")
            logger.info("new best EMA pseudo Dice %.4f -> checkpoint_best.pt", self.best_metric)
        self.save("latest")
        self.write_progress("training")


__all__ = ["TrainerEpoch"]
