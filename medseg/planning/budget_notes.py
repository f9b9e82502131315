"""The budget fit's record, ``plan.notes["budget"]``: what was measured, at which levers, what each candidate
promises in the budget, and why the winner won.

:func:`budget_notes` builds the whole record of one fit (:func:`medseg.planning.budget.fit_plan_to_budget`); one
row per candidate (:func:`candidate_rows`) holds its width, patch and batch, the levers it trains at
(:func:`fitted_levers`), the predicted iterations and samples (:func:`prediction`), its score, status and the
spread of its timed rounds. Patch sizes are ``(Z, Y, X)`` (``(Y, X)`` for 2D), times in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NotRequired, TypedDict

import torch

from medseg.planning.budget_rules import USABLE_FRACTION, Measured, candidate_dict
from medseg.planning.candidates import Candidate
from medseg.planning.levers import Levers
from medseg.planning.plan import NetworkPlan
from medseg.planning.step_timing import CHEAP_ROUNDS_SECONDS, StepSetting, StepTiming


class Isolation(TypedDict):
    """The budget report's ``isolation``: where the steps ran; children started, their summed start-up
    seconds and (once one answered) their intra-op threads."""

    process: str
    children: int
    child_overhead_s: float
    child_threads: NotRequired[int | None]


def crash_record(s: StepSetting, t: StepTiming) -> dict[str, Any]:
    """The ``crashes`` entry of a setting whose step crashed its process: network, levers and status."""
    return {**s.net.summary(), "precision": s.precision, "channels_last": s.channels_last, "status": t.status}


def fitted_levers(m: Measured, precision: str, channels_last: bool) -> dict[str, Any]:
    """The levers ``m`` trains at: its own where its step crashed at the fit's (``precision``,
    ``channels_last``), else the fit's."""
    return {
        "precision": m.precision or precision,
        "channels_last": channels_last if m.channels_last is None else m.channels_last,
    }


def prediction(m: Measured, budget_s: float, need: int) -> dict[str, Any]:
    """The notes' per-candidate numbers: step time, iterations, samples, coverage, whole-image samples, converges."""
    if m.step_time_s is None:
        return {
            "step_time_s": None,
            "iterations": None,
            "samples": None,
            "samples_per_s": None,
            "patch_coverage": round(m.coverage, 4),
            "image_samples": None,
            "converges": False,
        }
    return {
        "step_time_s": m.step_time_s,
        "iterations": m.iterations(budget_s),
        "samples": m.samples(budget_s),
        "samples_per_s": round(m.samples_per_second, 4),
        "patch_coverage": round(m.coverage, 4),
        "image_samples": m.image_samples(budget_s),
        "converges": m.samples(budget_s) >= need,
    }


def candidate_rows(
    measured: Sequence[Measured],
    excluded: dict[Candidate, str],
    budget_s: float,
    need: int,
    precision: str,
    channels_last: bool,
) -> list[dict[str, Any]]:
    """The ``candidates`` rows: every measured (or skipped) candidate in grid order, then those excluded
    before measuring (``{candidate: why}``, at the fit's levers)."""
    rows = [
        {
            **candidate_dict(m.candidate),
            **fitted_levers(m, precision, channels_last),
            **prediction(m, budget_s, need),
            "score": m.candidate.score,
            "status": m.status,
            "spread": m.spread,
        }
        for m in measured
    ]
    rows += [
        {
            **candidate_dict(c),
            "precision": precision,
            "channels_last": channels_last,
            **prediction(Measured(c, None), budget_s, need),
            "score": c.score,
            "status": why,
            "spread": None,
        }
        for c, why in excluded.items()
    ]
    return rows


def budget_notes(
    *,
    device: str,
    minutes: float,
    configuration: str,
    arch: str,
    replaced: NetworkPlan,
    measure_steps: int,
    isolation: Isolation,
    crashes: list[dict[str, Any]],
    max_seconds: float | None,
    lev: Levers,
    measured: Sequence[Measured],
    excluded: dict[Candidate, str],
    chosen: Measured,
    reasoning: str,
    budget_s: float,
    need: int,
    measure_seconds: float,
) -> dict[str, Any]:
    """The fit's ``notes["budget"]`` (its keys in the order ``plans.json`` shows them).

    Args:
        device, minutes, configuration, arch, measure_steps, max_seconds: the fit's arguments (``minutes`` a
            float; ``max_seconds`` None without a time limit).
        replaced: the network the fit replaced.
        isolation, crashes: where the steps ran, and every setting that crashed its process
            (:func:`crash_record`).
        lev: the throughput levers and their notes.
        measured: every grid candidate in grid order; ``excluded``: those dropped before measuring, and why.
        chosen: the winner (one of ``measured``); ``reasoning``: why, from
            :func:`~medseg.planning.budget_rules.choose_candidate`.
        budget_s, need: the training budget in seconds and the samples that count as converging.
        measure_seconds: wall time the fit took.

    Returns:
        The record, JSON-ready.
    """
    precision, channels_last = lev.precision, lev.channels_last
    if chosen.precision is not None:
        reasoning += (
            f" It trains at {chosen.precision}{' channels-last' if chosen.channels_last else ''}: its step "
            f"crashed at {precision}{' channels-last' if channels_last else ''}."
        )
    return {
        "device": device,
        "minutes": minutes,
        "configuration": configuration,
        "arch": arch,
        "replaced": {
            "base_features": replaced.spec.base_features,
            "max_features": replaced.spec.max_features,
            "patch_size": list(replaced.patch_size),
            "batch_size": replaced.batch_size,
            "precision": replaced.precision,
        },
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "measure_steps": measure_steps,
        "statistic": (
            "step_time_s is the fastest of at least measure_steps timed rounds (more while they are "
            f"cheap, up to {CHEAP_ROUNDS_SECONDS:g} s): load only slows steps; 'spread' has min/median/max"
        ),
        "isolation": isolation,
        "crashes": crashes,
        "time_limit_seconds": None if max_seconds is None else round(float(max_seconds), 2),
        "rule": (
            f"iterations = floor(budget_s x {USABLE_FRACTION} / step_time_s); converging when iterations x "
            f"batch >= {need}; among converging candidates the largest base_features x patch voxels, ties to "
            "more samples; when none converges the most samples per second (patch_coverage and "
            "image_samples = samples x coverage are recorded, not used)"
        ),
        "levers": lev.notes,
        "candidates": candidate_rows(measured, excluded, budget_s, need, precision, channels_last),
        "chosen": {
            **candidate_dict(chosen.candidate),
            **fitted_levers(chosen, precision, channels_last),
            **prediction(chosen, budget_s, need),
        },
        "reasoning": lev.notes["reason"] + " " + reasoning,
        "measure_seconds": measure_seconds,
    }


__all__ = ["Isolation", "budget_notes", "candidate_rows", "crash_record", "fitted_levers", "prediction"]
