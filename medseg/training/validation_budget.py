"""The final validation of a time-budgeted run, fitted into the time it has.

**Estimate** (:func:`~medseg.inference.time_budget.case_seconds`, shared with ``medseg predict
--time-budget-per-case``): sliding-window positions of the case (per shift variant of its TTA,
:func:`~medseg.inference.sliding_window.tta_variants`) x flips x the measured eval forward time of one
patch (x :data:`~medseg.inference.time_budget.WINDOW_OVERHEAD` for the Gaussian weighting and flipping),
plus loading, resampling, export and the probabilities file
(:func:`~medseg.inference.time_budget.export_seconds`), plus :data:`SETUP_SECONDS` once.

**Shortening** (:func:`plan_validation`): when the full validation does not fit the time it has, first
fewer TTA passes per window (:func:`~medseg.inference.time_budget.pass_options`: without shifts, then
mirroring fewer axes, down to none), then, without TTA, only the cases (in order) that fit. What was
shortened and why is recorded in ``validation/metrics.json`` (``"time_budget"``).

**At run time** (:class:`ValidationClock`, on the :class:`~medseg.clock.Deadline` the run's
:class:`~medseg.clock.BudgetClock` gives it): before every case, the most passes with which it and the
later cases fit the time left, with estimates corrected by the ratio of measured to estimated time of
the cases done so far (so a pessimistic estimate up front costs TTA only on the first cases); when not
even one pass each fits, the case alone without TTA, else it is skipped. During a case the sliding
window checks the deadline before every network batch, and a case it cuts short is recorded as skipped.
Nothing raises: a deadline always yields a (possibly partial) validation.

A time-budgeted training reserves the estimate of the shortened validation, which is at most
:data:`MAX_VALIDATION_SHARE` of the budget. Shapes are ``(Z, Y, X)`` in voxels of the preprocessed case,
patches ``(Z, Y, X)`` or ``(Y, X)``, times in seconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medseg.clock import Deadline
from medseg.inference.time_budget import case_seconds, pass_options
from medseg.planning.stage import Stage
from medseg.training.device import autocast, channels_last_format

logger = logging.getLogger(__name__)

#: Most of a time budget the final validation may take; a longer one is shortened.
MAX_VALIDATION_SHARE = 0.25
#: Once per validation: the reference labels' dataset, the predictor.
SETUP_SECONDS = 1.0


@dataclass(frozen=True)
class ValidationNetwork:
    """The network as the final validation's time estimates see it: its patch, outputs and TTA.

    Attributes:
        patch_size: the network's patch, ``(Z, Y, X)`` or ``(Y, X)`` voxels.
        num_classes: classes of the network output.
        mirror_axes / total_stride: the network's TTA (:func:`~medseg.inference.sliding_window.tta_variants`).
        use_tta: whether the full validation uses TTA.
    """

    patch_size: tuple[int, ...]
    num_classes: int
    mirror_axes: tuple[int, ...] | None
    total_stride: tuple[int, ...]
    use_tta: bool = True

    @classmethod
    def of_stage(cls, stage: Stage, use_tta: bool) -> ValidationNetwork:
        """The network of a trained ``stage``."""
        return cls(stage.patch_size, stage.num_classes, stage.mirror_axes, stage.total_stride, use_tta)

    def pass_options(self) -> list[int]:
        """TTA passes per window a shortened validation can run, most first
        (:func:`~medseg.inference.time_budget.pass_options`)."""
        return pass_options(self.mirror_axes, self.total_stride, self.use_tta)

    def case_seconds(self, shape: Sequence[int], seconds_per_window: float, passes: int) -> float:
        """Estimated seconds of one case of spatial ``shape`` at ``passes`` TTA passes
        (:func:`~medseg.inference.time_budget.case_seconds`)."""
        return case_seconds(
            shape, self.patch_size, self.num_classes, seconds_per_window, passes, self.mirror_axes, self.total_stride
        )


@dataclass(frozen=True)
class ValidationPlan:
    """What the final validation runs: TTA passes per window, the cases, and the estimates.

    Attributes:
        passes: TTA passes per window of every validated case (1 = no TTA).
        full_passes: those of the full validation.
        cases: the cases validated, in order.
        skipped: held-out cases left out to fit the time.
        seconds: estimated seconds of this validation.
        full_seconds: estimated seconds of the full validation.
        limit: seconds it had (None = no limit).
    """

    passes: int
    full_passes: int
    cases: tuple[str, ...]
    skipped: tuple[str, ...]
    seconds: float
    full_seconds: float
    limit: float | None

    @property
    def shortened(self) -> bool:
        return self.passes < self.full_passes or bool(self.skipped)

    def note(self) -> str | None:
        """One sentence saying what was shortened and why (None for the full validation)."""
        if not self.shortened:
            return None
        if not self.cases:
            return (
                f"skipped to fit the time budget: not even one held-out case fits without TTA in the "
                f"{self.limit:.0f} s available (the full validation was estimated at {self.full_seconds:.0f} s)"
            )
        what = []
        if self.passes < self.full_passes:
            what.append(f"{self.passes} TTA pass(es) per window instead of {self.full_passes}")
        if self.skipped:
            what.append(f"{len(self.cases)} of {len(self.cases) + len(self.skipped)} held-out cases")
        return (
            f"shortened to fit the time budget: {' and '.join(what)} (the full validation was estimated at "
            f"{self.full_seconds:.0f} s, {self.limit:.0f} s were available)"
        )


def plan_validation(
    shapes: Mapping[str, Sequence[int]],
    network: ValidationNetwork,
    seconds_per_window: float,
    limit: float | None = None,
) -> ValidationPlan:
    """The most complete validation whose estimate fits ``limit`` seconds (see the module docstring).

    Args:
        shapes: case id -> preprocessed spatial shape ``(Z, Y, X)``, in validation order.
        network: the network validated (its patch, outputs and TTA).
        seconds_per_window: measured eval forward time of one patch.
        limit: seconds available; None = no limit (the full validation).

    Returns:
        The plan; with a limit below even one case without TTA, no case is validated.
    """
    options = network.pass_options()

    def total(passes: int, ids: Sequence[str]) -> float:
        return sum(network.case_seconds(shapes[c], seconds_per_window, passes) for c in ids)

    ids = tuple(shapes)
    if not ids:
        return ValidationPlan(options[0], options[0], (), (), 0.0, 0.0, limit)
    full = SETUP_SECONDS + total(options[0], ids)
    for passes in options:
        seconds = SETUP_SECONDS + total(passes, ids)
        if limit is None or seconds <= limit:
            return ValidationPlan(passes, options[0], ids, (), seconds, full, limit)
    kept: list[str] = []
    used = SETUP_SECONDS
    assert limit is not None
    for c in ids:
        s = total(1, [c])
        if used + s <= limit:
            kept.append(c)
            used += s
    if not kept:
        used = 0.0
    return ValidationPlan(1, options[0], tuple(kept), tuple(c for c in ids if c not in kept), used, full, limit)


class FinalValidationEstimate:
    """The final validation a training run expects (:func:`plan_validation`), planned again only when the
    forward time or the limit changed.

    Args:
        shapes: case id -> preprocessed spatial shape ``(Z, Y, X)`` of the held-out cases, in order.
        patch_size / num_classes / mirror_axes / total_stride: the network.
        use_tta: whether the full validation uses TTA.
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        patch_size: Sequence[int],
        num_classes: int,
        mirror_axes: Sequence[int] | None,
        total_stride: Sequence[int],
        use_tta: bool,
    ) -> None:
        self.shapes = dict(shapes)
        axes = None if mirror_axes is None else tuple(mirror_axes)
        self.network = ValidationNetwork(tuple(patch_size), int(num_classes), axes, tuple(total_stride), bool(use_tta))
        self._cached: tuple[tuple[float, float | None], ValidationPlan] | None = None

    def plan(self, seconds_per_window: float, limit: float | None) -> ValidationPlan:
        """The validation that fits ``limit`` seconds (None = the full one) at ``seconds_per_window``."""
        key = (seconds_per_window, limit)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, plan_validation(self.shapes, self.network, seconds_per_window, limit))
        return self._cached[1]


@dataclass(frozen=True)
class ValidationBudget:
    """The time a run's final validation has.

    Attributes:
        deadline: when the validation must be done (:meth:`medseg.clock.BudgetClock.final_deadline`).
        seconds_per_window: measured eval forward time of one patch.
        shapes: case id -> preprocessed spatial shape ``(Z, Y, X)`` of the held-out cases.
    """

    deadline: Deadline
    seconds_per_window: float
    shapes: Mapping[str, Sequence[int]]


class ValidationClock:
    """Runs a :class:`ValidationBudget`: per case, the most TTA passes that fit the time left, or a skip.

    Before each case: the most passes ``p`` with which this and every later case fit the time left, each
    estimated with :func:`~medseg.inference.time_budget.case_seconds` times the ratio of measured to
    estimated seconds of the cases done so far; when not even one pass each fits, this case alone without
    TTA (so the first cases are kept), or a skip. :attr:`plan` is the up-front :func:`plan_validation` (what the log and the record report as
    expected).

    Args:
        budget: deadline, forward time and case shapes.
        case_ids: the held-out cases, in order.
        network: the network validated (its patch, outputs and TTA).
    """

    def __init__(self, budget: ValidationBudget, case_ids: Sequence[str], network: ValidationNetwork) -> None:
        self.budget = budget
        self.order = list(case_ids)
        self.network = network
        self.available = budget.deadline.remaining()  # seconds the validation has, from its start
        shapes = {c: tuple(budget.shapes[c]) for c in case_ids}
        self.plan = plan_validation(shapes, network, budget.seconds_per_window, max(0.0, self.available))
        self.options = network.pass_options()
        self.skipped: dict[str, str] = {}
        self.passes: dict[str, int] = {}
        self.estimated = 0.0
        self.measured = 0.0

    def left(self) -> float:
        """Seconds left until the deadline (negative once it has passed)."""
        return self.budget.deadline.remaining()

    def over(self) -> bool:
        """True once the deadline has passed (the sliding window's ``should_stop``)."""
        return self.budget.deadline.expired()

    def _raw(self, cid: str, passes: int) -> float:
        return self.network.case_seconds(self.budget.shapes[cid], self.budget.seconds_per_window, passes)

    def _estimate(self, cid: str, passes: int) -> float:
        ratio = self.measured / self.estimated if self.estimated > 0 else 1.0
        return ratio * self._raw(cid, passes)

    def passes_for(self, cid: str) -> int | None:
        """TTA passes for ``cid`` (see the class docstring), or None: skip the case (recorded)."""
        left = self.left()
        later = self.order[self.order.index(cid) + 1 :]
        for passes in self.options:
            if self._estimate(cid, passes) + sum(self._estimate(c, passes) for c in later) <= left:
                return passes
        if self._estimate(cid, 1) <= left:
            return 1
        self.skipped[cid] = (
            f"not enough time left (~{self._estimate(cid, 1):.0f} s needed without TTA, {max(left, 0.0):.0f} s left)"
        )
        return None

    def done(self, cid: str, passes: int, seconds: float) -> None:
        """Record a validated case and how long it took (corrects the later estimates)."""
        self.passes[cid] = passes
        self.estimated += self._raw(cid, passes)
        self.measured += seconds

    def interrupted(self, cid: str) -> None:
        """Record a case the deadline cut short."""
        self.skipped[cid] = "cut short: the time budget's deadline came during its prediction"

    def record(self) -> dict[str, Any]:
        """The ``"time_budget"`` entry of ``metrics.json``."""
        full = self.plan.full_passes
        fewer = sorted({p for p in self.passes.values() if p < full})
        shortened = bool(self.skipped) or bool(fewer)
        note = None
        if shortened:
            what = []
            if fewer:
                what.append(
                    f"{len([p for p in self.passes.values() if p < full])} case(s) with "
                    f"{'/'.join(map(str, fewer))} TTA pass(es) per window instead of {full}"
                )
            if self.skipped:
                what.append(
                    f"{len(self.passes)} of {len(self.order)} held-out cases validated (skipped_cases says "
                    "why the others were not)"
                )
            note = (
                f"shortened to fit the time budget: {' and '.join(what)}; {self.available:.0f} s "
                f"were available, the full validation was estimated at {self.plan.full_seconds:.0f} s"
            )
        return {
            "seconds_available": round(self.available, 2),
            "estimated_full_seconds": round(self.plan.full_seconds, 2),
            "estimated_seconds": round(self.plan.seconds, 2),
            "full_tta_passes": full,
            "tta_passes": dict(self.passes),
            "skipped_cases": dict(self.skipped),
            "shortened": shortened,
            "note": note,
        }


@torch.no_grad()
def measure_forward_seconds(
    model: torch.nn.Module,
    in_channels: int,
    patch_size: Sequence[int],
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    max_seconds: float = math.inf,
    repeats: int = 3,
) -> float:
    """Eval forward seconds per patch of ``model`` on a random ``(B, C, *patch)`` batch.

    One untimed pass, then up to ``repeats`` timed ones (fewer once ``max_seconds`` have passed, at least
    one); the fastest counts: the first passes of a new network and shape are slower than the steady state
    (memory being mapped, kernels chosen). The model is put back in train mode afterwards.
    """
    x = torch.randn((batch_size, in_channels, *patch_size), device=device)
    if channels_last:
        x = x.contiguous(memory_format=channels_last_format(len(patch_size)))
    model.eval()
    start = time.perf_counter()
    times: list[float] = []
    try:
        for i in range(1 + max(1, repeats)):
            t = time.perf_counter()
            with autocast(device, amp_dtype):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i > 0:
                times.append(time.perf_counter() - t)
                if time.perf_counter() - start > max_seconds:
                    break
    finally:
        model.train()
    return min(times) / batch_size


__all__ = [
    "MAX_VALIDATION_SHARE",
    "FinalValidationEstimate",
    "ValidationBudget",
    "ValidationClock",
    "ValidationNetwork",
    "ValidationPlan",
    "measure_forward_seconds",
    "plan_validation",
]
