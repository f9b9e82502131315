"""The trainer's validation hook: the pseudo Dice of each epoch, and the time of the final validation.

:class:`TrainerValidation` is a base of :class:`~medseg.training.trainer.Trainer`: the final validation's
estimate (:class:`~medseg.training.validation_budget.FinalValidationEstimate` at the measured forward time)
plus the last checkpoints are the reserve its :class:`~medseg.clock.BudgetClock` keeps after training;
:meth:`TrainerValidation.validation_budget` is the time the final validation gets (the clock's
:meth:`~medseg.clock.BudgetClock.final_deadline`). Times are in seconds.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from medseg.clock import BudgetClock, TrainingClock
from medseg.distributed import DistContext
from medseg.planning.plan import Plan
from medseg.training.config import TrainConfig
from medseg.training.data import CaseData, PatchSampler
from medseg.training.distributed import unwrap
from medseg.training.run_record import RunRecord
from medseg.training.validation import pseudo_dice
from medseg.training.validation_budget import (
    MAX_VALIDATION_SHARE,
    FinalValidationEstimate,
    ValidationBudget,
    ValidationPlan,
)

logger = logging.getLogger(__name__)


class TrainerValidation:
    """Pseudo Dice, final-validation time and the kept-plan warning of a :class:`~medseg.training.trainer.Trainer` (its base)."""

    cfg: TrainConfig
    plan: Plan
    clock: TrainingClock
    model: nn.Module
    dist: DistContext
    val_cases: list[CaseData]
    val_sampler: PatchSampler
    final_estimate: FinalValidationEstimate
    epoch: int
    iteration: int
    _warn_kept_plan: bool
    local_batch: int
    batch_lo: int
    batch_hi: int
    num_classes: int
    device: Any
    amp_dtype: Any
    channels_last: bool
    fwd_seconds_per_sample: float | None
    pseudo_dice_seconds: float | None
    end_epoch_seconds: float | None
    _param_count: int | None
    run_record: RunRecord

    @property
    def budget(self) -> BudgetClock | None:
        """The clock of a time-budgeted run, None for an epoch-based one."""
        return self.clock if isinstance(self.clock, BudgetClock) else None

    def training_done(self) -> bool:
        raise NotImplementedError

    def _seconds_per_window(self) -> float:
        """Eval forward seconds of one patch: measured, or half a training step per sample when that is less
        (a training step is forward + backward; the measured forward errs slow while the network is new)."""
        step = self.clock.step_seconds
        from_steps = None if step is None else step / max(1, self.local_batch) / 2.0
        if self.fwd_seconds_per_sample is None:
            return from_steps if from_steps is not None else 1.0 / 3.0
        return self.fwd_seconds_per_sample if from_steps is None else min(self.fwd_seconds_per_sample, from_steps)

    def final_validation_plan(self) -> ValidationPlan | None:
        """The final validation this run expects to run (None when there is none): under a time budget the
        one that fits :data:`MAX_VALIDATION_SHARE` of it."""
        if not (self.cfg.final_validation and self.val_cases):
            return None
        limit = None if self.budget is None else self.budget.share(MAX_VALIDATION_SHARE)
        return self.final_estimate.plan(self._seconds_per_window(), limit)

    def final_validation_estimate(self) -> float:
        """Seconds the final sliding-window validation is expected to take (0 when there is none)."""
        plan = self.final_validation_plan()
        return 0.0 if plan is None else plan.seconds

    def validation_budget(self) -> ValidationBudget | None:
        """The time the final validation has (until the budget ends, less a small margin), or None."""
        if self.budget is None:
            return None
        return ValidationBudget(self.budget.final_deadline(), self._seconds_per_window(), self.final_estimate.shapes)

    def _checkpoint_seconds(self) -> float:
        """Seconds of writing one checkpoint: measured at the epoch ends, else from the model's size."""
        if self.end_epoch_seconds is not None:
            return self.end_epoch_seconds
        if self._param_count is None:
            self._param_count = sum(p.numel() for p in self.model.parameters())
        return 0.5 + self._param_count * 4 * 3 / 100e6  # weights and two optimizer moments at ~100 MB/s

    def _reserved_seconds(self) -> float:
        """What comes after the last iteration: the final validation, the last epoch's bookkeeping and the
        final checkpoints (the reserve of the :class:`~medseg.clock.BudgetClock`)."""
        return self.final_validation_estimate() + 2.0 * self._checkpoint_seconds()

    def _skip_pseudo_dice(self) -> bool:
        """Whether this epoch's pseudo Dice would cross the training deadline (time-budget runs)."""
        if self.budget is None:
            return False
        seconds = self.pseudo_dice_seconds
        if seconds is None:  # not measured yet: estimate from the forward time
            seconds = 1.5 * self.cfg.val_iters * self.local_batch * self._seconds_per_window()
        return self.training_done() or not self.budget.fits(seconds)

    def _pseudo_dice(self) -> dict[str, Any]:
        """This epoch's pseudo Dice on ``val_iters`` held-out batches (:func:`~medseg.training.validation.pseudo_dice`)."""
        first = self.epoch * self.cfg.val_iters
        val, per_sample = pseudo_dice(
            unwrap(self.model),
            self.val_sampler,
            range(first, first + self.cfg.val_iters),
            self.batch_lo,
            self.batch_hi,
            self.num_classes,
            self.dist,
            device=self.device,
            amp_dtype=self.amp_dtype,
            channels_last=self.channels_last,
            regions=self.plan.region_classes,
            ignore_index=self.plan.ignore_class,
        )
        if per_sample is not None:
            old = self.fwd_seconds_per_sample
            self.fwd_seconds_per_sample = per_sample if old is None else 0.5 * (old + per_sample)
        return val

    def _warn_about_kept_plan(self, step_seconds: float) -> None:
        """One warning, after the first step, for a plan kept although it is not fitted to the budget."""
        self._warn_kept_plan = False
        expected = self.iteration + (0 if self.budget is None else self.budget.iterations_left(step_seconds))
        fit = self.run_record.budget_fit or {}
        logger.warning(
            "%s (kept: %s): one training step takes %.1f s, so about %d iterations fit in the %g-minute budget",
            fit.get("reason", "the plan is not fitted to the time budget"),
            fit.get("kept_by"),
            step_seconds,
            expected,
            self.cfg.time_budget_minutes,
        )


__all__ = ["TrainerValidation"]
