"""Fit a plan to the machine and the training time you have: measure candidate networks, keep the one
that learns most in the budget.

nnU-Net sizes a plan for a GPU and a 1000-epoch schedule (250k iterations, 500k patches at batch 2). On a
CPU, or with a deadline, that network finishes a few hundred iterations and has not converged. With a
time budget, :func:`fit_plan_to_budget` times a few real training steps of a small, fixed grid of
candidates (:mod:`medseg.planning.candidates`) on the training device
(:mod:`medseg.planning.step_timing`) and replaces the default network of one configuration with the
candidate that maximises what can be learned in the budget.

**Throughput levers**, measured once on the lever candidate (the widest network, at the smallest patch
and the smallest batch: wide layers are where bf16 and channels-last pay or not, and the smallest batch
halves the cost of timing every setting on it), interleaved round-robin so that a changing machine load
affects every setting alike; the fastest setting is kept for every candidate. The settings tried per
device are those of :func:`medseg.planning.levers.lever_settings`.

**Choice rule** (:func:`choose_candidate`):

* ``iterations(c) = floor(budget_seconds * USABLE_FRACTION / step_time(c))`` (10% of the budget is
  kept for validation and data loading hiccups), ``samples(c) = iterations(c) * batch(c)``.
* ``c`` *converges* when ``samples(c) >= MIN_SAMPLES`` (:data:`MIN_SAMPLES_3D` for 3D,
  :data:`MIN_SAMPLES_2D` for 2D configurations). The notes also record ``image_samples(c) = samples(c) x
  coverage(c)`` (:func:`patch_coverage`, the share of the median image the patch covers), for information
  only: counting convergence in it was measured worse on CHAOS T2 (:mod:`medseg.planning.resolution`).
* Among converging candidates the largest ``capacity x context`` score wins, ``base_features x patch
  voxels``; ties (same width and patch, other batch) go to more samples.
* When none converges, the candidate with the most samples per second wins (it gets closest to
  convergence); ties go to the larger score. The spacing itself is then a lever too
  (:mod:`medseg.planning.resolution`).

Candidates are measured cheapest first, in waves; a candidate is skipped without measuring when a
cheaper one that *dominates* it (no more features, no larger patch on any axis, same batch) already
cannot converge: the skipped one is at least as slow per step, so it cannot converge either and has
fewer samples per second, and the rule could never choose it.

**Time limit** (``max_seconds``; ``medseg plan --time-budget M`` and ``medseg train --time-budget M``
pass :func:`fit_seconds_limit`, :data:`FIT_FRACTION` of the budget): the cheapest candidate is *probed*
first (one warm-up and one timed step, at the setting a run uses without measurements,
:func:`medseg.planning.levers._default_lever`); every later measurement is predicted from the nearest
measured candidate (:func:`scaled_step_time`, which errs on the slow side) and only run when it fits what is
left of the limit: the levers on the lever candidate when they fit half of it, else on the probed candidate, else
not at all (the probe's setting is kept); the candidates of a wave cheapest first, with fewer timed
steps when that is what fits. The candidates not measured for time are never chosen. The probe always
runs, so only a cheapest candidate slower than the limit itself makes the fit overrun it. Without a
limit the fit measures as described above.

**Native crashes**: every measurement runs in a child process
(:func:`medseg.planning.step_child.measure_in_child`), so a step that kills its process (issue 42: torch 2.13's
bf16 backward at 12x256x256 on a CPU with AMX dies of SIGSEGV) costs the fit one child, not the ``medseg plan``
that runs it. A setting that crashed is never chosen, like one out of memory: a crashed probe is repeated
at another precision (bf16 -> fp32, :func:`medseg.planning.levers._fallback_lever`) and its setting is not
measured as a lever; a crashed lever setting is not kept; a grid candidate that crashed at the kept levers is
measured again at the fastest other precision and, when chosen, trains at that one. Every crash is listed in
``notes["budget"]["crashes"]`` and in the status of its lever result or candidate row. Each child costs its
start (about 2-3 s on 2 cores), which the time limit counts (:class:`~medseg.planning.fit_clock.FitClock`).

**Step time** is the fastest timed round of a setting (load only slows steps; see
:mod:`medseg.planning.step_timing`), with the rounds' min/median/max in each row's ``spread``.

Everything measured, and why the winner won, is written to ``plan.notes["budget"]`` so that a person
reading ``plans.json`` can see the reasoning. The chosen channels-last setting is recorded there too
(``notes["budget"]["chosen"]["channels_last"]``); the precision goes into ``NetworkPlan.precision``.
Patch sizes are ``(Z, Y, X)`` (``(Y, X)`` for 2D), times in seconds.

Modules: the rule and its constants (:mod:`medseg.planning.budget_rules`), the candidate grid
(:mod:`medseg.planning.candidates`), the throughput levers (:mod:`medseg.planning.levers`), measuring the grid
(:mod:`medseg.planning.budget_measure`) within the time limit (:mod:`medseg.planning.fit_clock`), the
``notes["budget"]`` record (:mod:`medseg.planning.budget_notes`), and the fit itself (here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from medseg.errors import PlanError
from medseg.options import DeviceKind, choices, valid_values
from medseg.planning.budget_measure import measure_grid
from medseg.planning.budget_notes import Isolation, budget_notes, crash_record
from medseg.planning.budget_rules import (
    FIT_FRACTION,
    MIN_SAMPLES,
    MIN_SAMPLES_2D,
    MIN_SAMPLES_3D,
    USABLE_FRACTION,
    Measured,
    choose_candidate,
    fit_seconds_limit,
    patch_coverage,
    scaled_step_time,
)
from medseg.planning.candidates import (
    Candidate,
    check_candidates,
    default_candidates,
    filter_by_memory,
    network_memory_gb,
)
from medseg.planning.fit_clock import FitClock, now
from medseg.planning.levers import Levers, grid_fallback, lever_settings, measure_levers
from medseg.planning.plan import ConfigurationPlan, NetworkPlan, Plan
from medseg.planning.step_child import CHILD_START_SECONDS, measure_in_child
from medseg.planning.step_timing import (
    CHEAP_ROUNDS_SECONDS,
    DEFAULT_MEASURE_STEPS,
    StepSetting,
    StepTiming,
)

logger = logging.getLogger(__name__)

#: ``(net, in_channels, num_classes, device, precision, channels_last, steps) -> seconds per step`` (or a
#: :class:`~medseg.planning.step_timing.StepTiming`, e.g. one whose status says the step crashed).
MeasureFn = Callable[[NetworkPlan, int, int, str, str, bool, int], "float | StepTiming"]


def fit_plan_to_budget(
    plan: Plan,
    device: str,
    minutes: float,
    *,
    configuration: str | None = None,
    arch: str | None = None,
    candidates: list[Candidate] | None = None,
    measure_steps: int = DEFAULT_MEASURE_STEPS,
    seed: int = 0,
    measure_fn: MeasureFn | None = None,
    max_seconds: float | None = None,
    levers: tuple[str, bool] | None = None,
    reference_times: dict[Candidate, float] | None = None,
) -> Plan:
    """Replace one configuration's network (its default one unless ``arch``) by the candidate that learns most
    in ``minutes``.

    Args:
        plan: a validated plan (e.g. from :func:`medseg.planning.planner.plan_dataset`).
        device: ``"cpu"`` or ``"cuda"``: where training will run; the measurement runs there.
        minutes: training time budget in minutes.
        configuration: configuration to fit (default: the plan's default configuration); it becomes the
            plan's default configuration. Other configurations are kept as they were.
        arch: architecture to fit (default: the configuration's default); the configuration's
            ``patch_size``/``batch_size`` follow it only when it is the default architecture.
        candidates: grid to measure (default :func:`default_candidates` of the planned network); every
            patch must be divisible by the planned network's total stride.
        measure_steps: timed steps per measurement at least (the fastest is used; cheap batches get more), after
            one warm-up step.
        seed: seed of the random weights and data used for the measurement.
        measure_fn: replaces the real measurement (tests, cached tables): called as
            ``measure_fn(net, in_channels, num_classes, device, precision, channels_last, steps)`` per
            setting in this process, returning seconds per step (``math.inf`` = out of memory) or a
            :class:`~medseg.planning.step_timing.StepTiming` (e.g. a ``crashed (SIGSEGV)`` one). Default:
            interleaved real measurement, one child process per batch of settings
            (:func:`~medseg.planning.step_child.measure_in_child`).
        max_seconds: time limit of the measuring (see the module docstring); None = no limit.
        levers: ``(precision, channels_last)`` already chosen (e.g. by the fit at another spacing): the levers
            are not measured again.
        reference_times: step times measured elsewhere (candidates of another spacing, at ``levers``) that
            predict this grid's step times until its own are measured.

    Returns:
        A new validated :class:`Plan` (``dataclasses.replace``): the fitted network has the chosen width,
        patch, batch and precision (and a fresh memory estimate; a configuration's ``patch_size``/``batch_size``
        are those of its default network), ``time_budget_minutes=minutes``,
        ``device=device``, ``default_configuration=configuration``, and ``notes["budget"]`` records every candidate's measured
        step time (and its rounds' spread), precision, channels-last, predicted iterations and samples, the
        reasoning, the time limit, the measuring processes and every setting that crashed its process (never
        chosen). Spacing, normalisation and the data identifier are never changed (a preprocessed
        cache stays valid).

    Raises:
        PlanError: bad budget, device, configuration or candidates; CUDA asked for but not available;
            no candidate could be measured (every setting out of memory or crashed).
    """
    t_start = now()
    try:
        minutes = float(minutes)
    except (TypeError, ValueError):
        raise PlanError(f"the time budget must be a positive number of minutes, got {minutes!r}") from None
    if not (math.isfinite(minutes) and minutes > 0):
        raise PlanError(f"the time budget must be a positive number of minutes, got {minutes!r}")
    if device not in choices(DeviceKind):
        raise PlanError(f"device must be {valid_values(DeviceKind)}, got {device!r}")
    if measure_steps < 1:
        raise PlanError(f"measure_steps must be >= 1, got {measure_steps}")
    if max_seconds is not None and not max_seconds >= 0:
        raise PlanError(f"max_seconds must be >= 0 (or None for no limit), got {max_seconds!r}")
    if device == DeviceKind.CUDA and measure_fn is None and not torch.cuda.is_available():
        raise PlanError(
            "cannot fit the plan to a CUDA time budget: no CUDA device is available here to measure on; "
            "plan on the training machine, or use --device cpu"
        )
    cfg_name = configuration or plan.default_configuration
    cfg = plan.configuration(cfg_name)
    arch = arch or cfg.default_arch
    template = cfg.network(arch)
    median = tuple(cfg.median_shape[-cfg.dims :])
    grid = list(candidates) if candidates is not None else default_candidates(template, median)
    check_candidates(grid, template)
    budget_s = float(minutes) * 60.0
    cin, k = plan.network_in_channels(cfg_name), plan.num_classes
    need = MIN_SAMPLES[cfg.dims]
    excluded: dict[Candidate, str] = {}

    if device == DeviceKind.CUDA:
        grid, excluded = filter_by_memory(grid, template, plan.gpu_memory_gb, cin, k)
        if not grid:
            raise PlanError(
                f"no budget candidate of {cfg_name} fits {plan.gpu_memory_gb} GB of GPU memory; raise --gpu-memory-gb"
            )

    crashes: list[dict[str, Any]] = []
    isolation: Isolation = {
        "process": "in this process (measure_fn)"
        if measure_fn is not None
        else "a child process per batch of settings (a native crash kills only the child)",
        "children": 0,
        "child_overhead_s": 0.0,
    }

    def measure(settings: list[StepSetting], steps: int) -> list[StepTiming]:
        if measure_fn is not None:
            out = [
                measure_fn(s.net, s.in_channels, s.num_classes, s.device, s.precision, s.channels_last, steps)
                for s in settings
            ]
            timings = [t if isinstance(t, StepTiming) else StepTiming.from_seconds(t) for t in out]
        else:
            m = measure_in_child(settings, steps, seed=seed)
            clock.observe(m)
            isolation["children"] += m.children
            isolation["child_overhead_s"] = round(isolation["child_overhead_s"] + m.overhead_s, 2)
            isolation["child_threads"] = m.threads
            timings = m.timings
        crashes.extend(crash_record(s, t) for s, t in zip(settings, timings) if t.crashed)
        return timings

    def setting(c: Candidate, precision: str, channels_last: bool) -> StepSetting:
        return StepSetting(c.network(template, precision), cin, k, device, precision, channels_last)

    clock = FitClock(
        max_seconds,
        t_start,
        measure_steps,
        0.0 if measure_fn is not None else CHILD_START_SECONDS + CHEAP_ROUNDS_SECONDS,
    )
    if levers is None:
        lev = measure_levers(grid, device, setting, measure, clock)
    else:
        lev = Levers(
            *levers,
            None,
            StepTiming(math.inf, "not measured"),
            {
                "chosen": {"precision": levers[0], "channels_last": levers[1]},
                "reason": f"Levers given ({levers[0]}, channels-last {'on' if levers[1] else 'off'}).",
            },
        )
    precision, channels_last = lev.precision, lev.channels_last
    fallback = grid_fallback(
        lev, lever_settings(device)[0], lambda cs, n, pair: measure([setting(c, *pair) for c in cs], n)
    )
    measured = measure_grid(
        grid,
        budget_s,
        need,
        lev.candidate,
        lev.timing.seconds,
        lambda cs, n: measure([setting(c, precision, channels_last) for c in cs], n),
        clock,
        coverage=lambda c: patch_coverage(c.patch_size, median),
        reference=reference_times,
        fallback=fallback,
        lever_spread=lev.timing.spread(),
    )
    best_i, reasoning = choose_candidate(measured, budget_s, cfg.dims)
    chosen = measured[best_i]
    # the winner trains at its own precision where its step crashed at the fit's levers
    new_net = chosen.candidate.network(template, chosen.precision or precision)
    new_net = replace(new_net, estimated_memory_gb=network_memory_gb(new_net, cin, k, device))
    new_cfg: ConfigurationPlan = replace(cfg, networks={**cfg.networks, arch: new_net})
    notes = budget_notes(
        device=device,
        minutes=float(minutes),
        configuration=cfg_name,
        arch=arch,
        replaced=template,
        measure_steps=measure_steps,
        isolation=isolation,
        crashes=crashes,
        max_seconds=max_seconds,
        lev=lev,
        measured=measured,
        excluded=excluded,
        chosen=chosen,
        reasoning=reasoning,
        budget_s=budget_s,
        need=need,
        measure_seconds=round(now() - t_start, 2),
    )
    logger.info("budget fit of %s: %s", cfg_name, notes["reasoning"])
    if max_seconds is not None and notes["measure_seconds"] > max_seconds:
        logger.warning(
            "the budget fit took %.1f s, over its %.0f s limit: one step of the cheapest candidate "
            "alone takes %s s here",
            notes["measure_seconds"],
            max_seconds,
            (lev.notes.get("probe") or {}).get("step_time_s"),
        )
    new_plan = replace(
        plan,
        configurations={**plan.configurations, cfg_name: new_cfg},
        default_configuration=cfg_name,
        device=device,
        time_budget_minutes=float(minutes),
        notes={**plan.notes, "budget": notes},
    )
    return new_plan.validate()


__all__ = [
    "FIT_FRACTION",
    "MIN_SAMPLES",
    "MIN_SAMPLES_2D",
    "MIN_SAMPLES_3D",
    "USABLE_FRACTION",
    "Measured",
    "choose_candidate",
    "fit_plan_to_budget",
    "fit_seconds_limit",
    "patch_coverage",
    "scaled_step_time",
]
