"""The throughput levers of the budget fit: which ``(precision, channels_last)`` settings a device offers,
measuring them, and what to fall back to when a setting's step crashes its process.

**The settings** (:func:`lever_settings`) worth timing on a device:

* CPU: ``fp32``, plus ``bf16`` autocast when oneDNN has native bf16 kernels (AVX512-BF16 / AMX;
  without them bf16 runs on slow reference kernels and is not tried); channels-last on and off.
* CUDA: ``fp16`` AMP, plus ``bf16`` AMP where the GPU supports it; channels-last on and off.

**Measuring** (:func:`measure_levers`): every setting is timed on the lever candidate (the widest network at
the smallest patch and batch), interleaved, and the fastest is kept for every candidate. Under the fit's time
limit the cheapest candidate is probed first at the setting a run uses without measurements
(:func:`_default_lever`), and the levers are measured only where they fit (see :mod:`medseg.planning.budget`).

**Crashes**: a setting whose step killed its process is never kept. A crashed probe is repeated at another
precision (:func:`_fallback_lever`: bf16 -> fp32); a grid candidate that crashes at the kept levers is measured
again at :func:`grid_fallback`'s setting (by :func:`medseg.planning.budget_measure.measure_grid`).

Times in seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medseg.errors import PlanError
from medseg.options import DeviceKind, Precision
from medseg.planning.budget_rules import LEVER_SHARE, candidate_dict, finite_or_none, scaled_step_time
from medseg.planning.candidates import Candidate
from medseg.planning.fit_clock import FitClock
from medseg.planning.step_timing import StepSetting, StepTiming


def cpu_bf16_supported() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        available = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]  # unannotated in torch
        return bool(available and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def lever_settings(device: str) -> tuple[list[tuple[str, bool]], str]:
    """The ``(precision, channels_last)`` pairs worth measuring on ``device``, and why those.

    Returns:
        ``(pairs, reason)``.
    """
    if torch.device(device).type == DeviceKind.CUDA:
        precisions = [Precision.FP16]
        bf16 = False
        try:
            bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        except (AssertionError, RuntimeError):
            bf16 = False
        if bf16:
            precisions.append(Precision.BF16)
        reason = "CUDA: automatic mixed precision (fp16" + (", bf16" if bf16 else "; no bf16 on this GPU") + ")"
    elif cpu_bf16_supported():
        precisions = [Precision.FP32, Precision.BF16]
        reason = "CPU with native bf16 (oneDNN AVX512-BF16/AMX): fp32 and bf16 autocast"
    else:
        precisions = [Precision.FP32]
        reason = (
            f"CPU without native bf16 (capability {torch.backends.cpu.get_cpu_capability()}): bf16 would run "
            "on slow reference kernels, so only fp32 is measured"
        )
    return [(p, cl) for p in precisions for cl in (False, True)], reason + "; channels-last off and on"


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


def pair_label(pair: tuple[str, bool]) -> str:
    """A setting as the notes and statuses name it, e.g. ``"bf16 channels-last"`` or ``"fp32"``."""
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
    (see :mod:`medseg.planning.budget`). A setting whose step crashed its process (the probe's included) is never
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
            + ", ".join(f"{pair_label(p)} {crashed.get(p) or timings[p].status}" for p in pairs)
        )
    best_t, _, (precision, channels_last) = min(ok)
    parts = []
    for p in pairs:
        t = timings.get(p)
        if t is not None and t.ok:
            parts.append(f"{pair_label(p)} {t.seconds:.3f} s")
        else:
            parts.append(f"{pair_label(p)} {crashed.get(p) or (t.status if t else 'not measured')}")
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
            + (" (" + ", ".join(f"{pair_label(p)} {st}" for p, st in crashed.items()) + ")." if crashed else ".")
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
class GridFallback:
    """Where a grid candidate whose step crashed at the fit's levers is measured again."""

    primary: tuple[str, bool]
    pair: tuple[str, bool]
    ratio: float  # expected step time at ``pair`` / at ``primary`` (for the time limit)
    measure: Callable[[list[Candidate], int], list[StepTiming]]


def grid_fallback(
    lev: Levers,
    pairs: Sequence[tuple[str, bool]],
    measure: Callable[[list[Candidate], int, tuple[str, bool]], list[StepTiming]],
) -> GridFallback | None:
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
    return GridFallback(primary, pair, ratio, lambda cs, n: measure(cs, n, pair))


def _default_lever(device: str, pairs: Sequence[tuple[str, bool]]) -> tuple[str, bool]:
    """The ``(precision, channels_last)`` a run uses on ``device`` without measurements: on the CPU bf16 where it
    is native (else fp32) and channels-last; on CUDA fp16 without channels-last (``TrainConfig`` defaults)."""
    precisions = [p for p, _ in pairs]
    if torch.device(device).type == DeviceKind.CUDA:
        return (Precision.FP16, False) if (Precision.FP16, False) in pairs else pairs[0]
    want = (Precision.BF16 if Precision.BF16 in precisions else Precision.FP32, True)
    return want if want in pairs else pairs[0]


__all__ = [
    "GridFallback",
    "Levers",
    "cpu_bf16_supported",
    "grid_fallback",
    "lever_settings",
    "measure_levers",
    "pair_label",
]
