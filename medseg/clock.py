"""One place for a run's time: how long it has run, how far it is, when it must stop.

Training asks a :class:`TrainingClock` -- :class:`EpochClock` for a run of a fixed number of epochs,
:class:`BudgetClock` for a run with a time budget -- whether to stop, what progress drives the
learning-rate schedule and how long a step takes; the final validation and the sliding window ask a
:class:`Deadline` (from :meth:`BudgetClock.final_deadline`) how much time is left and whether it is over.
Every clock reads an injectable time source (``time.perf_counter`` by default) so tests can drive it.

The policy numbers of a time budget live here: the training deadline leaves
``min(`` :data:`END_MARGIN_SECONDS` ``, `` :data:`END_MARGIN_SHARE` ``x budget)`` unused, the final
validation ends ``min(`` :data:`FINAL_MARGIN_SECONDS` ``, `` :data:`FINAL_MARGIN_SHARE` ``x budget)``
before the budget does. All times are in seconds.

Base layer: imports only the standard library.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

#: The time source of every clock unless one is injected: seconds on a monotonic clock.
TimeSource = Callable[[], float]

#: Seconds a time budget keeps unused after the training deadline (at most), ...
END_MARGIN_SECONDS = 30.0
#: ... and that as a share of the budget (the smaller one counts).
END_MARGIN_SHARE = 0.02
#: Seconds before the end of the budget by which the final validation must be done (at most), ...
FINAL_MARGIN_SECONDS = 2.0
#: ... and that as a share of the budget (the smaller one counts).
FINAL_MARGIN_SHARE = 0.01
#: Weights of the previous value and of the new step in the smoothed step time (exponential moving average).
STEP_SMOOTHING = (0.9, 0.1)


class Deadline:
    """A point in time on a time source: the seconds left until it, and whether it has passed.

    Args:
        at: the deadline, a value of ``time_source``.
        time_source: the clock it is read on.
    """

    def __init__(self, at: float, time_source: TimeSource = time.perf_counter) -> None:
        self.at = float(at)
        self.time_source = time_source

    @classmethod
    def after(cls, seconds: float, time_source: TimeSource = time.perf_counter) -> Deadline:
        """The deadline ``seconds`` from now (now when ``seconds`` is negative)."""
        return cls(time_source() + max(float(seconds), 0.0), time_source)

    def remaining(self) -> float:
        """Seconds left until the deadline (negative once it has passed)."""
        return self.at - self.time_source()

    def expired(self) -> bool:
        """True once the deadline has come (a sliding window's ``should_stop``)."""
        return self.time_source() >= self.at


class TrainingClock(Protocol):
    """What the trainer asks its clock: elapsed time, progress, whether to stop, and the step time."""

    #: Whether the clock can stop a run in the middle of an epoch (a time budget).
    stops_mid_epoch: bool
    #: Smoothed seconds of one training iteration (None before the first).
    step_seconds: float | None

    def elapsed(self) -> float: ...

    def deadline(self) -> float | None: ...

    def progress(self, iteration: int) -> float: ...

    def should_stop(self, epoch: int, iteration: int) -> bool: ...

    def step_done(self, seconds: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _RunTime:
    """Seconds a run has spent over all its sessions, each counted from its start, and its step time.

    Args:
        started: ``time_source()`` when this session started; None = now.
        time_source: the clock read (``time.perf_counter`` by default).
    """

    stops_mid_epoch = False

    def __init__(self, started: float | None = None, time_source: TimeSource = time.perf_counter) -> None:
        self.time_source = time_source
        self.started = time_source() if started is None else float(started)
        self.elapsed_before = 0.0  # seconds of the earlier sessions of a resumed run
        self.step_seconds: float | None = None

    def now(self) -> float:
        return self.time_source()

    def elapsed(self) -> float:
        """Seconds this run has spent, over all its sessions."""
        return self.elapsed_before + self.time_source() - self.started

    def step_done(self, seconds: float) -> None:
        """Record the wall time of one training iteration (smoothed into :attr:`step_seconds`)."""
        old = self.step_seconds
        keep, new = STEP_SMOOTHING
        self.step_seconds = seconds if old is None else keep * old + new * seconds

    def state_dict(self) -> dict[str, Any]:
        """``elapsed_seconds`` and ``step_seconds``: what a resumed run continues from."""
        return {"elapsed_seconds": self.elapsed(), "step_seconds": self.step_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run from :meth:`state_dict` (this session counts on from the seconds stored)."""
        self.elapsed_before = float(state.get("elapsed_seconds") or 0.0)
        self.step_seconds = state.get("step_seconds")


class EpochClock(_RunTime):
    """The clock of an epoch-based run: progress is iterations done of ``max_epochs x iters_per_epoch``.

    Args:
        max_epochs: epochs of the run.
        iters_per_epoch: iterations of an epoch.
        started / time_source: as for the elapsed time (:class:`BudgetClock`).
    """

    def __init__(
        self,
        max_epochs: int,
        iters_per_epoch: int,
        *,
        started: float | None = None,
        time_source: TimeSource = time.perf_counter,
    ) -> None:
        super().__init__(started, time_source)
        self.max_epochs = int(max_epochs)
        self.iters_per_epoch = int(iters_per_epoch)

    def deadline(self) -> float | None:
        """None: an epoch-based run has no deadline."""
        return None

    def progress(self, iteration: int) -> float:
        """``iteration / total iterations``, at most 1."""
        return min(1.0, iteration / (self.max_epochs * self.iters_per_epoch))

    def should_stop(self, epoch: int, iteration: int) -> bool:
        """True once ``max_epochs`` epochs are done."""
        return epoch >= self.max_epochs


class BudgetClock(_RunTime):
    """The clock of a run with a time budget: training stops at a deadline that leaves time for what
    comes after it (the final validation, the last checkpoints: ``reserve``) and a margin.

    Args:
        budget_seconds: the whole run's budget (a refit of the plan, training and the final validation).
        reserve: seconds needed after the last training iteration, asked afresh each time (the estimates
            improve as the run goes on).
        max_epochs: an epoch limit as well (None = none).
        started / time_source: ``time_source()`` when the command started (what came before training,
            e.g. a budget refit, counts against the budget; None = now), and the clock read.
    """

    stops_mid_epoch = True

    def __init__(
        self,
        budget_seconds: float,
        reserve: Callable[[], float] = lambda: 0.0,
        *,
        max_epochs: int | None = None,
        started: float | None = None,
        time_source: TimeSource = time.perf_counter,
    ) -> None:
        super().__init__(started, time_source)
        self.budget_seconds = float(budget_seconds)
        self.reserve = reserve
        self.max_epochs = max_epochs
        self._progress_floor = 0.0  # progress reached in this session

    def remaining(self) -> float:
        """Seconds of the budget left (negative once it is spent)."""
        return self.budget_seconds - self.elapsed()

    def fraction_used(self) -> float:
        """Elapsed seconds as a fraction of the budget."""
        return self.elapsed() / self.budget_seconds if self.budget_seconds > 0 else 1.0

    def expired(self) -> bool:
        """True once the whole budget is spent."""
        return self.remaining() <= 0.0

    def share(self, fraction: float) -> float:
        """``fraction`` of the budget in seconds (e.g. the most the final validation may take)."""
        return fraction * self.budget_seconds

    def deadline(self) -> float | None:
        """Elapsed seconds at which training iterations must stop: the budget less the reserve and the margin."""
        margin = min(END_MARGIN_SECONDS, END_MARGIN_SHARE * self.budget_seconds)
        return max(self.budget_seconds - self.reserve() - margin, 0.0)

    def progress(self, iteration: int) -> float:
        """Elapsed time over the deadline, in [0, 1]; never lower than before in this session (the deadline
        moves a little as the estimates improve, the schedule must not go back)."""
        deadline = self.deadline()
        assert deadline is not None
        p = min(1.0, self.elapsed() / deadline) if deadline > 0 else 1.0
        self._progress_floor = max(self._progress_floor, p)
        return self._progress_floor

    def should_stop(self, epoch: int, iteration: int) -> bool:
        """True once the epoch limit is reached or the next step would end after the deadline."""
        if self.max_epochs is not None and epoch >= self.max_epochs:
            return True
        deadline = self.deadline()
        assert deadline is not None
        return self.elapsed() + (self.step_seconds or 0.0) >= deadline

    def fits(self, seconds: float) -> bool:
        """Whether ``seconds`` more work ends before the training deadline."""
        deadline = self.deadline()
        assert deadline is not None
        return self.elapsed() + seconds <= deadline

    def iterations_left(self, step_seconds: float) -> int:
        """Iterations of ``step_seconds`` that fit before the training deadline."""
        deadline = self.deadline()
        assert deadline is not None
        return max(0, int((deadline - self.elapsed()) / max(step_seconds, 1e-9)))

    def final_deadline(self) -> Deadline:
        """When the final validation must be done: the end of the budget less a small margin."""
        margin = min(FINAL_MARGIN_SECONDS, FINAL_MARGIN_SHARE * self.budget_seconds)
        return Deadline.after(self.remaining() - margin, self.time_source)


__all__ = [
    "END_MARGIN_SECONDS",
    "END_MARGIN_SHARE",
    "FINAL_MARGIN_SECONDS",
    "FINAL_MARGIN_SHARE",
    "STEP_SMOOTHING",
    "BudgetClock",
    "Deadline",
    "EpochClock",
    "TimeSource",
    "TrainingClock",
]
