"""The budget fit's time limit: its wall clock, what is left of the limit and what a measurement would cost.

The fit (:mod:`medseg.planning.budget`) predicts the cost of every measurement before it runs one, from the
predicted step times, the warm-up and timed steps, the set-up of each setting and the start of a measuring
child process, and runs it only when it fits what is left (see the module docstring of
:mod:`medseg.planning.budget`). Times in seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from medseg.planning.budget_rules import SETUP_SECONDS
from medseg.planning.step_child import ChildMeasurement
from medseg.planning.step_timing import CHEAP_ROUNDS_SECONDS, WARMUP_STEPS

#: Wall clock of the fit's time limit (tests replace it).
_clock = time.perf_counter


def now() -> float:
    """The fit's wall clock in seconds (:data:`_clock`, which tests replace)."""
    return _clock()


class FitClock:
    """What is left of the fit's time limit, and what measuring would cost (``max_seconds`` None: no limit).

    ``per_call`` is what one measurement costs besides its steps: for the real measurement a child process
    (:data:`~medseg.planning.step_child.CHILD_START_SECONDS` until :meth:`observe` saw one) and the extra
    rounds of a cheap batch (:data:`~medseg.planning.step_timing.CHEAP_ROUNDS_SECONDS`); 0 for a ``measure_fn``.
    """

    def __init__(self, max_seconds: float | None, start: float, most_steps: int, per_call: float = 0.0) -> None:
        self.max_seconds, self.start, self.most_steps, self.per_call = max_seconds, start, most_steps, per_call
        self._children, self._overhead = 0, 0.0

    def observe(self, m: ChildMeasurement) -> None:
        """Count the start-up of the children of a real measurement into :attr:`per_call` from now on."""
        self._children += m.children
        self._overhead += m.overhead_s
        if self._children:
            self.per_call = self._overhead / self._children + CHEAP_ROUNDS_SECONDS

    @property
    def limited(self) -> bool:
        return self.max_seconds is not None

    def left(self) -> float:
        if self.max_seconds is None:
            return math.inf
        return self.max_seconds - (_clock() - self.start)

    def cost(self, step_times: Sequence[float], steps: int) -> float:
        return self.per_call + sum((WARMUP_STEPS + steps) * t + SETUP_SECONDS for t in step_times)

    def steps_for(self, step_times: Sequence[float], share: float = 1.0) -> int:
        """The most timed steps (up to ``most_steps``) measuring ``step_times`` can take in ``share`` of
        what is left; 0 when not even one fits."""
        if not self.limited:
            return self.most_steps
        room = share * self.left()
        return next((n for n in range(self.most_steps, 0, -1) if self.cost(step_times, n) <= room), 0)
