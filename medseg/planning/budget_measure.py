"""Measuring the candidate grid for the budget fit: cheapest first, in waves, within what is left of its time limit.

The throughput levers are measured before (:mod:`medseg.planning.levers`); the time limit is kept by
:class:`~medseg.planning.fit_clock.FitClock`. See :mod:`medseg.planning.budget` for the rule of the fit and how
the time limit is spent. Times in seconds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from medseg.planning.budget_rules import Measured, finite_or_none, scaled_step_time
from medseg.planning.candidates import Candidate
from medseg.planning.fit_clock import FitClock
from medseg.planning.levers import GridFallback, pair_label
from medseg.planning.step_timing import StepTiming

logger = logging.getLogger(__name__)


def measure_grid(
    grid: Sequence[Candidate],
    budget_s: float,
    need: int,
    lever_cand: Candidate | None,
    lever_time: float,
    measure: Callable[[list[Candidate], int], list[StepTiming]],
    clock: FitClock,
    coverage: Callable[[Candidate], float] = lambda c: 1.0,
    reference: dict[Candidate, float] | None = None,
    fallback: GridFallback | None = None,
    lever_spread: dict[str, Any] | None = None,
) -> list[Measured]:
    """Measure the grid cheapest first, in waves, skipping what a non-converging cheaper candidate dominates.

    A wave holds the pending candidates that no other pending one dominates; each wave is measured together
    (interleaved). Under a time limit a wave keeps, cheapest first by predicted step time, the candidates
    whose measurement fits what is left (with fewer timed steps where needed); the others are not measured.
    ``lever_cand`` (None: none) is a grid candidate already measured; ``reference`` holds step times measured
    elsewhere (another spacing) that only serve to predict step times. A candidate whose step crashed its
    process at the fit's levers is measured again at ``fallback`` (when it fits the time limit) and keeps
    those levers; its status says so.
    Returns one :class:`Measured` per grid candidate, in grid order.
    """
    times: dict[Candidate, float | None] = {}
    status: dict[Candidate, str] = {}
    spreads: dict[Candidate, dict[str, Any] | None] = {}
    own_levers: dict[Candidate, tuple[str, bool]] = {}
    if lever_cand is not None:
        times[lever_cand] = finite_or_none(lever_time)
        status[lever_cand] = "measured (lever candidate)"
        spreads[lever_cand] = lever_spread
    ref = {c: t for c, t in (reference or {}).items() if t is not None and math.isfinite(t) and t > 0}

    def fails(c: Candidate) -> bool:
        t = times.get(c)
        return t is not None and Measured(c, t, coverage=coverage(c)).samples(budget_s) < need

    def predicted(c: Candidate) -> float:
        known = [(d, t) for d, t in times.items() if t is not None] or list(ref.items())
        if not known:
            return math.inf
        d, t = min(known, key=lambda dt: abs(math.log(c.cost / dt[0].cost)))
        return scaled_step_time(t, d, c)

    pending = [c for c in sorted(grid, key=lambda c: (c.cost, c.base_features)) if c not in times]
    while pending:
        for c in list(pending):
            blocker = next((d for d in times if fails(d) and d.dominates(c)), None)
            if blocker is not None:
                pending.remove(c)
                times[c] = None
                status[c] = (
                    f"skipped: the cheaper {blocker.label} already cannot reach {need} samples in the "
                    "budget, so this one cannot either and has fewer samples per second"
                )
        wave = [c for c in pending if not any(d.dominates(c) for d in pending)]
        wave, steps, left_out = _fit_in_limit(wave, {c: predicted(c) for c in wave} if clock.limited else {}, clock)
        if not wave and left_out and not any(t is not None for t in times.values()):
            # nothing of this grid measured yet and no time left (a fit at a second spacing): probe the cheapest
            # with one step rather than choose from predictions alone
            probe = min(left_out, key=lambda c: (predicted(c), c.cost))
            del left_out[probe]
            wave, steps = [probe], 1
        for c, why in left_out.items():
            pending.remove(c)
            times[c], status[c] = None, f"not measured: {why}"
        crashed: list[Candidate] = []
        for c, t in zip(wave, measure(wave, steps) if wave else []):
            times[c] = finite_or_none(t.seconds) if t.ok else None
            status[c], spreads[c] = t.status, t.spread()
            pending.remove(c)
            if t.crashed:
                crashed.append(c)
        if crashed and fallback is not None:
            primary, pair = pair_label(fallback.primary), pair_label(fallback.pair)
            est = {c: predicted(c) * fallback.ratio for c in crashed} if clock.limited else {}
            again, steps, left_out = _fit_in_limit(crashed, est, clock)
            for c, why in left_out.items():
                status[c] += f" at {primary}; not measured at {pair}: {why}"
            for c, t in zip(again, fallback.measure(again, steps) if again else []):
                first = status[c]
                if t.ok:
                    times[c], spreads[c], own_levers[c] = finite_or_none(t.seconds), t.spread(), fallback.pair
                    status[c] = f"measured at {pair} ({first} at {primary})"
                else:
                    status[c] = f"{first} at {primary}; {t.status} at {pair}"
    no_levers: tuple[str | None, bool | None] = (None, None)  # measured at the fit's levers
    return [Measured(c, times[c], status[c], coverage(c), *own_levers.get(c, no_levers), spreads.get(c)) for c in grid]


def _fit_in_limit(
    cands: list[Candidate], est: dict[Candidate, float], clock: FitClock
) -> tuple[list[Candidate], int, dict[Candidate, str]]:
    """The candidates (cheapest first by predicted step time ``est``) whose measurement fits what is left of
    the fit's time limit, their timed steps, and why each other one is left out. Without a limit: all of them."""
    if not clock.limited or not cands:
        return cands, clock.most_steps, {}
    kept: list[Candidate] = []
    for c in sorted(cands, key=lambda c: est[c]):
        if clock.steps_for([est[d] for d in (*kept, c)]) > 0:
            kept.append(c)
    steps = clock.steps_for([est[d] for d in kept]) if kept else 0
    return (
        kept,
        steps,
        {
            c: (f"its ~{est[c]:.2f} s steps do not fit what is left of the fit's {clock.max_seconds:.0f} s time limit")
            for c in cands
            if c not in kept
        },
    )
