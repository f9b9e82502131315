"""Measuring for the budget fit under its time limit: the throughput levers, then the candidate grid in waves.

See :mod:`medseg.planning.budget` for the rule of the fit and how the time limit is spent. Times in seconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medseg.errors import PlanError
from medseg.options import DeviceKind, Precision
from medseg.planning.budget_rules import (
    LEVER_SHARE,
    SETUP_SECONDS,
    Measured,
    candidate_dict,
    finite_or_none,
    scaled_step_time,
)
from medseg.planning.candidates import Candidate
from medseg.planning.step_child import ChildMeasurement
from medseg.planning.step_timing import (
    CHEAP_ROUNDS_SECONDS,
    WARMUP_STEPS,
    StepSetting,
    StepTiming,
    lever_settings,
)

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Levers:
    """What :func:`measure_levers` decided: the setting, where it was measured, and what crashed."""

    precision: str
    channels_last: bool
    candidate: Candidate | None  # the grid candidate measured at the setting (None: none)
    timing: StepTiming  # of ``candidate`` at the setting
    notes: dict[str, Any]
    crashed: frozenset[tuple[str, bool]] = frozenset()
    times: tuple[tuple[tuple[str, bool], float], ...] = ()  # step time of each setting measured on ``candidate``


def _pair_label(pair: tuple[str, bool]) -> str:
    return f"{pair[0]}{' channels-last' if pair[1] else ''}"


def measure_levers(
    grid: Sequence[Candidate],
    device: str,
    setting: Callable[[Candidate, str, bool], StepSetting],
    measure: Callable[[list[StepSetting], int], list[StepTiming]],
    clock: FitClock,
) -> Levers:
    """Time every lever setting on the lever candidate (widest, smallest patch, smallest batch); keep the fastest.

    Under a time limit the cheapest candidate is probed first and the levers are measured where they fit
    (see the module docstring). A setting whose step crashed its process (the probe's included) is never
    kept: a crashed probe is repeated at :func:`_fallback_lever` (bf16 -> fp32) and the crashed setting is
    not measured again.

    Raises:
        PlanError: every setting crashed, or none could be measured at all.
    """
    pairs, options = lever_settings(device)
    cand = max(grid, key=lambda c: (c.base_features, c.max_features, -c.patch_voxels, -c.batch_size))
    steps, probe_notes, probe_timing = clock.most_steps, None, None
    crashed: dict[tuple[str, bool], str] = {}
    if clock.limited:
        probe = min(grid, key=lambda c: (c.cost, c.base_features))
        pair: tuple[str, bool] | None = _default_lever(device, pairs)
        tried: list[dict[str, Any]] = []
        while True:
            assert pair is not None
            probe_timing = measure([setting(probe, *pair)], 1)[0]
            if not probe_timing.crashed:
                break
            crashed[pair] = probe_timing.status
            tried.append({"precision": pair[0], "channels_last": pair[1], "status": probe_timing.status})
            pair = _fallback_lever(pair, pairs, crashed)
            if pair is None:
                raise PlanError(
                    f"every training step setting crashed its process on {device} when probing "
                    f"{probe.label}: " + ", ".join(f"{t['precision']}: {t['status']}" for t in tried)
                )
        t_probe = probe_timing.seconds
        probe_notes = {
            **candidate_dict(probe),
            "precision": pair[0],
            "channels_last": pair[1],
            "step_time_s": finite_or_none(t_probe),
        }
        if tried:
            probe_notes["crashed"] = tried
        live = [p for p in pairs if p not in crashed]
        if probe_timing.ok:
            steps = clock.steps_for([scaled_step_time(t_probe, probe, cand)] * len(live), LEVER_SHARE)
            if steps == 0:
                cand = probe
                steps = clock.steps_for([t_probe] * len(live), LEVER_SHARE)
            if steps == 0 or not live:
                return _kept_probe(
                    probe,
                    pair,
                    probe_timing,
                    probe_notes,
                    options,
                    crashed,
                    f"after probing {probe.label} ({t_probe:.3f} s per step) the fit's "
                    f"{clock.max_seconds:.0f} s time limit left no room",
                )
    live = [p for p in pairs if p not in crashed]
    timings = dict(zip(live, measure([setting(cand, *p) for p in live], steps)))
    crashed.update({p: t.status for p, t in timings.items() if t.crashed})
    ok = [(t.seconds, i, p) for i, (p, t) in enumerate(timings.items()) if t.ok]
    if not ok:
        if probe_timing is not None and probe_timing.ok and probe_notes is not None:
            return _kept_probe(
                probe,
                (probe_notes["precision"], probe_notes["channels_last"]),
                probe_timing,
                probe_notes,
                options,
                crashed,
                f"no setting could be measured on {cand.label}",
            )
        raise PlanError(
            f"{cand.label} could not be measured on {device} with any setting: "
            + ", ".join(f"{_pair_label(p)} {crashed.get(p) or timings[p].status}" for p in pairs)
        )
    best_t, _, (precision, channels_last) = min(ok)
    parts = []
    for p in pairs:
        t = timings.get(p)
        if t is not None and t.ok:
            parts.append(f"{_pair_label(p)} {t.seconds:.3f} s")
        else:
            parts.append(f"{_pair_label(p)} {crashed.get(p) or (t.status if t else 'not measured')}")
    notes: dict[str, Any] = {
        "measured_on": candidate_dict(cand),
        "options": options,
        "results": [_lever_row(p, timings.get(p), crashed.get(p)) for p in pairs],
        "chosen": {"precision": precision, "channels_last": channels_last},
        "reason": (
            f"Levers measured on {cand.label}: " + ", ".join(parts) + f"; kept the fastest, {precision} "
            f"with channels-last {'on' if channels_last else 'off'}, for every candidate"
            + (" (a setting that crashed its process is never kept)." if crashed else ".")
        ),
    }
    if probe_notes is not None:
        notes["probe"] = probe_notes
        notes["steps"] = steps
    return Levers(
        precision,
        channels_last,
        cand,
        timings[(precision, channels_last)],
        notes,
        frozenset(crashed),
        tuple((p, t.seconds) for p, t in timings.items() if t.ok),
    )


def _kept_probe(
    probe: Candidate,
    pair: tuple[str, bool],
    timing: StepTiming,
    probe_notes: dict[str, Any],
    options: str,
    crashed: dict[tuple[str, bool], str],
    why: str,
) -> Levers:
    """Levers not measured: the probe's setting (the default one, or its fallback after a crash) is kept."""
    precision, channels_last = pair
    notes = {
        "measured_on": candidate_dict(probe),
        "options": options,
        "probe": probe_notes,
        "results": [_lever_row(pair, timing, None)] + [_lever_row(p, None, st) for p, st in crashed.items()],
        "chosen": {"precision": precision, "channels_last": channels_last},
        "reason": (
            f"Levers not measured: {why}; kept {precision} with channels-last "
            f"{'on' if channels_last else 'off'}"
            + (" (" + ", ".join(f"{_pair_label(p)} {st}" for p, st in crashed.items()) + ")." if crashed else ".")
        ),
    }
    return Levers(precision, channels_last, probe, timing, notes, frozenset(crashed), ((pair, timing.seconds),))


def _lever_row(pair: tuple[str, bool], t: StepTiming | None, crash: str | None) -> dict[str, Any]:
    status = crash or (t.status if t is not None else "not measured")
    return {
        "precision": pair[0],
        "channels_last": pair[1],
        "step_time_s": finite_or_none(t.seconds) if t is not None and t.ok else None,
        "status": status,
        "spread": t.spread() if t is not None else None,
    }


def _fallback_lever(
    pair: tuple[str, bool], pairs: Sequence[tuple[str, bool]], crashed: Collection[tuple[str, bool]]
) -> tuple[str, bool] | None:
    """The setting to try after ``pair`` crashed: another precision first (bf16 -> fp32; fp32 always counts as a
    choice, also on CUDA), the same memory format first; None when every one crashed."""
    options = dict.fromkeys([*pairs, (Precision.FP32, pair[1]), (Precision.FP32, not pair[1])])
    left = [p for p in options if p not in crashed and p != pair]
    return min(left, key=lambda p: (p[0] == pair[0], p[1] != pair[1]), default=None)


@dataclass(frozen=True)
class _Fallback:
    """Where a grid candidate whose step crashed at the fit's levers is measured again."""

    primary: tuple[str, bool]
    pair: tuple[str, bool]
    ratio: float  # expected step time at ``pair`` / at ``primary`` (for the time limit)
    measure: Callable[[list[Candidate], int], list[StepTiming]]


def grid_fallback(
    lev: Levers,
    pairs: Sequence[tuple[str, bool]],
    measure: Callable[[list[Candidate], int, tuple[str, bool]], list[StepTiming]],
) -> _Fallback | None:
    """The fit's fallback setting for grid candidates that crash at its levers: the fastest measured setting
    of another precision, else :func:`_fallback_lever`."""
    primary = (lev.precision, lev.channels_last)
    times = dict(lev.times)
    other = [p for p in times if p[0] != primary[0]]
    pair = min(other, key=lambda p: times[p]) if other else _fallback_lever(primary, pairs, lev.crashed)
    if pair is None:
        return None
    t0 = times.get(primary)
    ratio = times[pair] / t0 if pair in times and t0 else 2.0
    return _Fallback(primary, pair, ratio, lambda cs, n: measure(cs, n, pair))


def _default_lever(device: str, pairs: Sequence[tuple[str, bool]]) -> tuple[str, bool]:
    """The ``(precision, channels_last)`` a run uses on ``device`` without measurements: on the CPU bf16 where it
    is native (else fp32) and channels-last; on CUDA fp16 without channels-last (``TrainConfig`` defaults)."""
    precisions = [p for p, _ in pairs]
    if torch.device(device).type == DeviceKind.CUDA:
        return (Precision.FP16, False) if (Precision.FP16, False) in pairs else pairs[0]
    want = (Precision.BF16 if Precision.BF16 in precisions else Precision.FP32, True)
    return want if want in pairs else pairs[0]


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
    fallback: _Fallback | None = None,
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
            primary, pair = _pair_label(fallback.primary), _pair_label(fallback.pair)
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
