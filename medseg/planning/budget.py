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
device are those of :func:`medseg.planning.step_timing.lever_settings`.

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
:func:`_default_lever`); every later measurement is predicted from the nearest measured candidate
(:func:`scaled_step_time`, which errs on the slow side) and only run when it fits what is left of the
limit: the levers on the lever candidate when they fit half of it, else on the probed candidate, else
not at all (the probe's setting is kept); the candidates of a wave cheapest first, with fewer timed
steps when that is what fits. The candidates not measured for time are never chosen. The probe always
runs, so only a cheapest candidate slower than the limit itself makes the fit overrun it. Without a
limit the fit measures as described above.

**Native crashes**: every measurement runs in a child process
(:func:`medseg.planning.step_timing.measure_in_child`), so a step that kills its process (issue 42: torch 2.13's
bf16 backward at 12x256x256 on a CPU with AMX dies of SIGSEGV) costs the fit one child, not the ``medseg plan``
that runs it. A setting that crashed is never chosen, like one out of memory: a crashed probe is repeated
at another precision (bf16 -> fp32, :func:`_fallback_lever`) and its setting is not measured as a lever; a
crashed lever setting is not kept; a grid candidate that crashed at the kept levers is measured again at the
fastest other precision and, when chosen, trains at that one. Every crash is listed in
``notes["budget"]["crashes"]`` and in the status of its lever result or candidate row. Each child costs
its start (about 2-3 s on 2 cores), which the time limit counts (:class:`_FitClock`).

**Step time** is the fastest timed round of a setting (load only slows steps; see
:mod:`medseg.planning.step_timing`), with the rounds' min/median/max in each row's ``spread``.

Everything measured, and why the winner won, is written to ``plan.notes["budget"]`` so that a person
reading ``plans.json`` can see the reasoning. The chosen channels-last setting is recorded there too
(``notes["budget"]["chosen"]["channels_last"]``); the precision goes into ``NetworkPlan.precision``.
Patch sizes are ``(Z, Y, X)`` (``(Y, X)`` for 2D), times in seconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from medseg.errors import PlanError
from medseg.planning.candidates import Candidate, default_candidates
from medseg.planning.memory import estimate_training_memory_gb
from medseg.planning.plan import ConfigurationPlan, NetworkPlan, Plan
from medseg.planning.step_timing import (
    CHEAP_ROUNDS_SECONDS,
    CHILD_START_SECONDS,
    DEFAULT_MEASURE_STEPS,
    WARMUP_STEPS,
    ChildMeasurement,
    StepSetting,
    StepTiming,
    lever_settings,
    measure_in_child,
)

logger = logging.getLogger(__name__)

#: Fraction of the budget spent on training iterations; the rest is left for the per-epoch validation,
#: checkpoints and data-loading stalls.
USABLE_FRACTION = 0.9
#: Training samples (iterations x batch) a 3D candidate must reach in the budget to count as converging.
#: nnU-Net trains 250k iterations (500k patches at batch 2), far past the point where its Dice stops
#: improving. medseg's experience on hippocampus-size images (patch covering the whole image) is that a
#: 16-feature 3D U-Net with a learning rate annealed over the run reaches its plateau after roughly
#: 4-5k patches, about 2500 iterations at batch 2; wider networks need at least as many. This is an
#: estimate to revisit as training results come in, not something this module measures.
MIN_SAMPLES_3D = 2500 * 2
#: The same bar for 2D configurations, counted in slices: nnU-Net v2 gives a hippocampus-size dataset a
#: 2D batch of 287 slices for a 3D batch of 7 patches of 40 slices (the same voxels per step), i.e. one
#: 3D sample is worth about 40 2D samples.
MIN_SAMPLES_2D = MIN_SAMPLES_3D * 40
MIN_SAMPLES = {3: MIN_SAMPLES_3D, 2: MIN_SAMPLES_2D}
#: Share of the budget the fit itself may spend measuring (:func:`fit_seconds_limit`): at most 3 minutes of a
#: 30-minute budget (the hippocampus fit takes 18-47 s on 2 cores), 24 s of a 4-minute one. ``medseg train
#: --time-budget`` refitting a plan spends it out of the training budget.
FIT_FRACTION = 0.1
#: Seconds of building a model and its random batch, per measured setting, in the fit's time accounting.
SETUP_SECONDS = 0.3
#: Share of the time left after the probe that measuring the levers may take.
LEVER_SHARE = 0.5

#: ``(net, in_channels, num_classes, device, precision, channels_last, steps) -> seconds per step`` (or a
#: :class:`~medseg.planning.step_timing.StepTiming`, e.g. one whose status says the step crashed).
MeasureFn = Callable[[NetworkPlan, int, int, str, str, bool, int], "float | StepTiming"]
#: Wall clock of the fit's time limit (tests replace it).
_clock = time.perf_counter


def fit_seconds_limit(minutes: float) -> float:
    """Seconds the fit of a ``minutes`` budget may spend measuring: :data:`FIT_FRACTION` of the budget."""
    return FIT_FRACTION * float(minutes) * 60.0


def scaled_step_time(step_time: float, measured: Candidate, other: Candidate) -> float:
    """Predicted step time of ``other`` from the measured step time of ``measured``, erring on the slow side.

    Linear in patch voxels and batch; in width, quadratic upwards (convolution FLOPs grow with the square
    of the channels) and linear downwards (the cheaper per-channel operations shrink only linearly).
    """
    f = other.base_features / measured.base_features
    return step_time * (f * f if f > 1 else f) * (other.patch_voxels / measured.patch_voxels) * (
        other.batch_size / measured.batch_size)


class _FitClock:
    """What is left of the fit's time limit, and what measuring would cost (``max_seconds`` None: no limit).

    ``per_call`` is what one measurement costs besides its steps: for the real measurement a child process
    (:data:`~medseg.planning.step_timing.CHILD_START_SECONDS` until :meth:`observe` saw one) and the extra
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


# ---------------------------------------------------------------------------------------------- choosing
def patch_coverage(patch_size: Sequence[int], median_shape: Sequence[float] | None) -> float:
    """Share of the median image one patch covers, ``min(1, prod(min(patch, median)) / prod(median))``.

    1.0 without a median shape. The convergence bar :data:`MIN_SAMPLES` was calibrated on patches that cover
    the whole image (hippocampus); ``samples x coverage`` ("whole-image samples") is recorded in the notes.
    """
    if not median_shape:
        return 1.0
    med = [max(1.0, float(m)) for m in median_shape]
    covered = math.prod(min(float(p), m) for p, m in zip(patch_size, med))
    return min(1.0, covered / math.prod(med))


@dataclass(frozen=True)
class Measured:
    """A candidate with its measured step time (``None`` when skipped or out of memory) and status.

    ``coverage`` is :func:`patch_coverage` of the candidate's patch on its configuration's median image.
    ``precision``/``channels_last`` are set when the candidate was measured at other levers than the fit's
    (its step crashed at those), ``spread`` holds the timed rounds' min/median/max.
    """

    candidate: Candidate
    step_time_s: float | None
    status: str = "measured"
    coverage: float = 1.0
    precision: str | None = None
    channels_last: bool | None = None
    spread: dict[str, Any] | None = None

    def iterations(self, budget_seconds: float) -> int:
        if self.step_time_s is None:
            return 0
        return int(math.floor(budget_seconds * USABLE_FRACTION / self.step_time_s))

    def samples(self, budget_seconds: float) -> int:
        return self.iterations(budget_seconds) * self.candidate.batch_size

    def image_samples(self, budget_seconds: float) -> int:
        """Samples in whole-image units, ``floor(samples x coverage)`` (recorded; the rule counts samples)."""
        return int(math.floor(self.samples(budget_seconds) * self.coverage))

    @property
    def samples_per_second(self) -> float:
        return 0.0 if self.step_time_s is None else self.candidate.batch_size / self.step_time_s


def choose_candidate(measured: Sequence[Measured], budget_seconds: float, dims: int) -> tuple[int, str]:
    """Apply the choice rule of the module docstring.

    Args:
        measured: candidates with their step times (``step_time_s`` None ones are never chosen).
        budget_seconds: training budget in seconds.
        dims: 2 or 3 (selects :data:`MIN_SAMPLES`).

    Returns:
        ``(index into measured, human-readable reasoning)``.

    Raises:
        PlanError: no candidate has a step time.
    """
    ok = [i for i, m in enumerate(measured) if m.step_time_s is not None]
    if not ok:
        raise PlanError("no budget candidate could be measured (all ran out of memory, crashed or were skipped)")
    need = MIN_SAMPLES[dims]
    usable = budget_seconds * USABLE_FRACTION
    head = (f"{budget_seconds / 60:g} min budget, {USABLE_FRACTION:.0%} = {usable:.0f} s of training steps; "
            f"a candidate converges when iterations x batch >= {need} samples. ")
    converging = [i for i in ok if measured[i].samples(budget_seconds) >= need]
    if converging:
        best = max(converging, key=lambda i: (measured[i].candidate.score, measured[i].samples(budget_seconds)))
        m = measured[best]
        rivals = [measured[i] for i in converging if i != best and measured[i].candidate.score == m.candidate.score]
        why = (f"{len(converging)} of {len(ok)} measured candidates converge; {m.candidate.label} has the largest "
               f"capacity x context (base features x patch voxels = {m.candidate.score})")
        if rivals:
            why += (f", and more samples ({m.samples(budget_seconds)}) than "
                    + ", ".join(f"{r.candidate.label} ({r.samples(budget_seconds)})" for r in rivals))
        not_conv = [measured[i] for i in ok if i not in converging and measured[i].candidate.score > m.candidate.score]
        if not_conv:
            big = max(not_conv, key=lambda r: r.candidate.score)
            why += (f"; the larger {big.candidate.label} would reach only {big.samples(budget_seconds)} samples")
    else:
        best = max(ok, key=lambda i: (measured[i].samples_per_second, measured[i].candidate.score))
        m = measured[best]
        why = (f"no candidate converges in the budget; {m.candidate.label} processes the most samples per second "
               f"({m.samples_per_second:.2f}/s, {m.samples(budget_seconds)} samples in the budget), so it gets "
               "closest to convergence")
    why += (f": {m.step_time_s:.3f} s/step, {m.iterations(budget_seconds)} iterations, "
            f"{m.samples(budget_seconds)} samples (patch coverage {m.coverage:.2f}).")
    return best, head + why


# ---------------------------------------------------------------------------------------------- the fit
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
            (:func:`~medseg.planning.step_timing.measure_in_child`).
        max_seconds: time limit of the measuring (see the module docstring); None = no limit.
        levers: ``(precision, channels_last)`` already chosen (e.g. by the fit at another spacing): the levers
            are not measured again.
        reference_times: step times measured elsewhere (candidates of another spacing, at ``levers``) that
            predict this grid's step times until its own are measured.

    Returns:
        A new validated :class:`Plan` (``dataclasses.replace``): the fitted network has the chosen width,
        patch, batch and precision (and a fresh memory estimate), the configuration's
        ``patch_size``/``batch_size`` match it (default architecture), ``time_budget_minutes=minutes``,
        ``device=device``, ``default_configuration=configuration``, and ``notes["budget"]`` records every candidate's measured
        step time (and its rounds' spread), precision, channels-last, predicted iterations and samples, the
        reasoning, the time limit, the measuring processes and every setting that crashed its process (never
        chosen). Spacing, normalisation and the data identifier are never changed (a preprocessed
        cache stays valid).

    Raises:
        PlanError: bad budget, device, configuration or candidates; CUDA asked for but not available;
            no candidate could be measured (every setting out of memory or crashed).
    """
    t_start = _clock()
    try:
        minutes = float(minutes)
    except (TypeError, ValueError):
        raise PlanError(f"the time budget must be a positive number of minutes, got {minutes!r}") from None
    if not (math.isfinite(minutes) and minutes > 0):
        raise PlanError(f"the time budget must be a positive number of minutes, got {minutes!r}")
    if device not in ("cpu", "cuda"):
        raise PlanError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if measure_steps < 1:
        raise PlanError(f"measure_steps must be >= 1, got {measure_steps}")
    if max_seconds is not None and not max_seconds >= 0:
        raise PlanError(f"max_seconds must be >= 0 (or None for no limit), got {max_seconds!r}")
    if device == "cuda" and measure_fn is None and not torch.cuda.is_available():
        raise PlanError(
            "cannot fit the plan to a CUDA time budget: no CUDA device is available here to measure on; "
            "plan on the training machine, or use --device cpu"
        )
    cfg_name = configuration or plan.default_configuration
    cfg = plan.configuration(cfg_name)
    arch = arch or cfg.default_arch
    template = cfg.network(arch)
    median = tuple(cfg.median_shape[-cfg.dims:])
    grid = list(candidates) if candidates is not None else default_candidates(template, median)
    _check_candidates(grid, template)
    budget_s = float(minutes) * 60.0
    cin, k = plan.network_in_channels(cfg_name), plan.num_classes
    need = MIN_SAMPLES[cfg.dims]
    excluded: dict[Candidate, str] = {}

    if device == "cuda":
        grid, excluded = _filter_by_memory(grid, template, plan, cin, k)
        if not grid:
            raise PlanError(
                f"no budget candidate of {cfg_name} fits {plan.gpu_memory_gb} GB of GPU memory; raise --gpu-memory-gb"
            )

    crashes: list[dict[str, Any]] = []
    isolation = {"process": "in this process (measure_fn)" if measure_fn is not None else
                 "a child process per batch of settings (a native crash kills only the child)",
                 "children": 0, "child_overhead_s": 0.0}

    def measure(settings: list[StepSetting], steps: int) -> list[StepTiming]:
        if measure_fn is not None:
            out = [measure_fn(s.net, s.in_channels, s.num_classes, s.device, s.precision, s.channels_last, steps)
                   for s in settings]
            timings = [t if isinstance(t, StepTiming) else StepTiming.from_seconds(t) for t in out]
        else:
            m = measure_in_child(settings, steps, seed=seed)
            clock.observe(m)
            isolation["children"] += m.children
            isolation["child_overhead_s"] = round(isolation["child_overhead_s"] + m.overhead_s, 2)
            isolation["child_threads"] = m.threads
            timings = m.timings
        crashes.extend({**_cand_dict_of(s.net), "precision": s.precision, "channels_last": s.channels_last,
                        "status": t.status} for s, t in zip(settings, timings) if t.crashed)
        return timings

    def setting(c: Candidate, precision: str, channels_last: bool) -> StepSetting:
        return StepSetting(c.network(template, precision), cin, k, device, precision, channels_last)

    clock = _FitClock(max_seconds, t_start, measure_steps,
                      0.0 if measure_fn is not None else CHILD_START_SECONDS + CHEAP_ROUNDS_SECONDS)
    if levers is None:
        lev = _measure_levers(grid, device, setting, measure, clock)
    else:
        lev = _Levers(*levers, None, StepTiming(math.inf, "not measured"),
                      {"chosen": {"precision": levers[0], "channels_last": levers[1]},
                       "reason": f"Levers given ({levers[0]}, channels-last {'on' if levers[1] else 'off'})."})
    precision, channels_last = lev.precision, lev.channels_last
    fallback = _grid_fallback(lev, lever_settings(device)[0], lambda cs, n, pair: measure(
        [setting(c, *pair) for c in cs], n))
    measured = _measure_grid(grid, budget_s, need, lev.candidate, lev.timing.seconds,
                             lambda cs, n: measure([setting(c, precision, channels_last) for c in cs], n), clock,
                             coverage=lambda c: patch_coverage(c.patch_size, median), reference=reference_times,
                             fallback=fallback, lever_spread=lev.timing.spread())
    best_i, reasoning = choose_candidate(measured, budget_s, cfg.dims)
    chosen = measured[best_i]

    def levers_of(m: Measured) -> dict[str, Any]:
        return {"precision": m.precision or precision,
                "channels_last": channels_last if m.channels_last is None else m.channels_last}

    new_net = chosen.candidate.network(template, levers_of(chosen)["precision"])
    new_net = replace(new_net, estimated_memory_gb=_estimate_memory(new_net, cin, k, device))
    new_cfg: ConfigurationPlan = replace(cfg, networks={**cfg.networks, arch: new_net})
    fit_levers = {"precision": precision, "channels_last": channels_last}
    rows = [{**_cand_dict(m.candidate), **levers_of(m), **_prediction(m, budget_s, need), "score": m.candidate.score,
             "status": m.status, "spread": m.spread} for m in measured]
    rows += [{**_cand_dict(c), **fit_levers, **_prediction(Measured(c, None), budget_s, need), "score": c.score,
              "status": why, "spread": None} for c, why in excluded.items()]
    if chosen.precision is not None:
        reasoning += (f" It trains at {chosen.precision}{' channels-last' if chosen.channels_last else ''}: its step "
                      f"crashed at {precision}{' channels-last' if channels_last else ''}.")
    notes = {
        "device": device,
        "minutes": float(minutes),
        "configuration": cfg_name,
        "arch": arch,
        "replaced": {"base_features": template.spec.base_features, "max_features": template.spec.max_features,
                     "patch_size": list(template.patch_size), "batch_size": template.batch_size,
                     "precision": template.precision},
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "measure_steps": measure_steps,
        "statistic": ("step_time_s is the fastest of at least measure_steps timed rounds (more while they are "
                      f"cheap, up to {CHEAP_ROUNDS_SECONDS:g} s): load only slows steps; 'spread' has min/median/max"),
        "isolation": isolation,
        "crashes": crashes,
        "time_limit_seconds": None if max_seconds is None else round(float(max_seconds), 2),
        "rule": (f"iterations = floor(budget_s x {USABLE_FRACTION} / step_time_s); converging when iterations x "
                 f"batch >= {need}; among converging candidates the largest base_features x patch voxels, ties to "
                 "more samples; when none converges the most samples per second (patch_coverage and "
                 "image_samples = samples x coverage are recorded, not used)"),
        "levers": lev.notes,
        "candidates": rows,
        "chosen": {**_cand_dict(chosen.candidate), **levers_of(chosen), **_prediction(chosen, budget_s, need)},
        "reasoning": lev.notes["reason"] + " " + reasoning,
        "measure_seconds": round(_clock() - t_start, 2),
    }
    logger.info("budget fit of %s: %s", cfg_name, notes["reasoning"])
    if max_seconds is not None and notes["measure_seconds"] > max_seconds:
        logger.warning("the budget fit took %.1f s, over its %.0f s limit: one step of the cheapest candidate "
                       "alone takes %s s here", notes["measure_seconds"], max_seconds,
                       (lev.notes.get("probe") or {}).get("step_time_s"))
    new_plan = replace(
        plan,
        configurations={**plan.configurations, cfg_name: new_cfg},
        default_configuration=cfg_name,
        device=device,
        time_budget_minutes=float(minutes),
        notes={**plan.notes, "budget": notes},
    )
    return new_plan.validate()


@dataclass(frozen=True)
class _Levers:
    """What :func:`_measure_levers` decided: the setting, where it was measured, and what crashed."""

    precision: str
    channels_last: bool
    candidate: Candidate | None  # the grid candidate measured at the setting (None: none)
    timing: StepTiming  # of ``candidate`` at the setting
    notes: dict[str, Any]
    crashed: frozenset[tuple[str, bool]] = frozenset()
    times: tuple[tuple[tuple[str, bool], float], ...] = ()  # step time of each setting measured on ``candidate``


def _pair_label(pair: tuple[str, bool]) -> str:
    return f"{pair[0]}{' channels-last' if pair[1] else ''}"


def _measure_levers(
    grid: Sequence[Candidate], device: str, setting: Callable[[Candidate, str, bool], StepSetting],
    measure: Callable[[list[StepSetting], int], list[StepTiming]], clock: _FitClock,
) -> _Levers:
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
                raise PlanError(f"every training step setting crashed its process on {device} when probing "
                                f"{probe.label}: " + ", ".join(f"{t['precision']}: {t['status']}" for t in tried))
        t_probe = probe_timing.seconds
        probe_notes = {**_cand_dict(probe), "precision": pair[0], "channels_last": pair[1],
                       "step_time_s": _finite_or_none(t_probe)}
        if tried:
            probe_notes["crashed"] = tried
        live = [p for p in pairs if p not in crashed]
        if probe_timing.ok:
            steps = clock.steps_for([scaled_step_time(t_probe, probe, cand)] * len(live), LEVER_SHARE)
            if steps == 0:
                cand = probe
                steps = clock.steps_for([t_probe] * len(live), LEVER_SHARE)
            if steps == 0 or not live:
                return _kept_probe(probe, pair, probe_timing, probe_notes, options, crashed,
                                   f"after probing {probe.label} ({t_probe:.3f} s per step) the fit's "
                                   f"{clock.max_seconds:.0f} s time limit left no room")
    live = [p for p in pairs if p not in crashed]
    timings = dict(zip(live, measure([setting(cand, *p) for p in live], steps)))
    crashed.update({p: t.status for p, t in timings.items() if t.crashed})
    ok = [(t.seconds, i, p) for i, (p, t) in enumerate(timings.items()) if t.ok]
    if not ok:
        if probe_timing is not None and probe_timing.ok and probe_notes is not None:
            return _kept_probe(probe, (probe_notes["precision"], probe_notes["channels_last"]), probe_timing,
                               probe_notes, options, crashed, f"no setting could be measured on {cand.label}")
        raise PlanError(f"{cand.label} could not be measured on {device} with any setting: " + ", ".join(
            f"{_pair_label(p)} {crashed.get(p) or timings[p].status}" for p in pairs))
    best_t, _, (precision, channels_last) = min(ok)
    parts = []
    for p in pairs:
        t = timings.get(p)
        if t is not None and t.ok:
            parts.append(f"{_pair_label(p)} {t.seconds:.3f} s")
        else:
            parts.append(f"{_pair_label(p)} {crashed.get(p) or (t.status if t else 'not measured')}")
    notes = {
        "measured_on": _cand_dict(cand),
        "options": options,
        "results": [_lever_row(p, timings.get(p), crashed.get(p)) for p in pairs],
        "chosen": {"precision": precision, "channels_last": channels_last},
        "reason": (f"Levers measured on {cand.label}: " + ", ".join(parts) + f"; kept the fastest, {precision} "
                   f"with channels-last {'on' if channels_last else 'off'}, for every candidate"
                   + (" (a setting that crashed its process is never kept)." if crashed else ".")),
    }
    if probe_notes is not None:
        notes["probe"] = probe_notes
        notes["steps"] = steps
    return _Levers(precision, channels_last, cand, timings[(precision, channels_last)], notes, frozenset(crashed),
                   tuple((p, t.seconds) for p, t in timings.items() if t.ok))


def _kept_probe(probe: Candidate, pair: tuple[str, bool], timing: StepTiming, probe_notes: dict[str, Any],
                options: str, crashed: dict[tuple[str, bool], str], why: str) -> _Levers:
    """Levers not measured: the probe's setting (the default one, or its fallback after a crash) is kept."""
    precision, channels_last = pair
    notes = {
        "measured_on": _cand_dict(probe), "options": options, "probe": probe_notes,
        "results": [_lever_row(pair, timing, None)] + [_lever_row(p, None, st) for p, st in crashed.items()],
        "chosen": {"precision": precision, "channels_last": channels_last},
        "reason": (f"Levers not measured: {why}; kept {precision} with channels-last "
                   f"{'on' if channels_last else 'off'}"
                   + (" (" + ", ".join(f"{_pair_label(p)} {st}" for p, st in crashed.items()) + ")." if crashed
                      else ".")),
    }
    return _Levers(precision, channels_last, probe, timing, notes, frozenset(crashed), ((pair, timing.seconds),))


def _lever_row(pair: tuple[str, bool], t: StepTiming | None, crash: str | None) -> dict[str, Any]:
    status = crash or (t.status if t is not None else "not measured")
    return {"precision": pair[0], "channels_last": pair[1],
            "step_time_s": _finite_or_none(t.seconds) if t is not None and t.ok else None, "status": status,
            "spread": t.spread() if t is not None else None}


def _fallback_lever(pair: tuple[str, bool], pairs: Sequence[tuple[str, bool]],
                    crashed: Collection[tuple[str, bool]]) -> tuple[str, bool] | None:
    """The setting to try after ``pair`` crashed: another precision first (bf16 -> fp32; fp32 always counts as a
    choice, also on CUDA), the same memory format first; None when every one crashed."""
    options = dict.fromkeys([*pairs, ("fp32", pair[1]), ("fp32", not pair[1])])
    left = [p for p in options if p not in crashed and p != pair]
    return min(left, key=lambda p: (p[0] == pair[0], p[1] != pair[1]), default=None)


@dataclass(frozen=True)
class _Fallback:
    """Where a grid candidate whose step crashed at the fit's levers is measured again."""

    primary: tuple[str, bool]
    pair: tuple[str, bool]
    ratio: float  # expected step time at ``pair`` / at ``primary`` (for the time limit)
    measure: Callable[[list[Candidate], int], list[StepTiming]]


def _grid_fallback(lev: _Levers, pairs: Sequence[tuple[str, bool]],
                   measure: Callable[[list[Candidate], int, tuple[str, bool]], list[StepTiming]]) -> _Fallback | None:
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
    if torch.device(device).type == "cuda":
        return ("fp16", False) if ("fp16", False) in pairs else pairs[0]
    want = ("bf16" if "bf16" in precisions else "fp32", True)
    return want if want in pairs else pairs[0]


def _measure_grid(
    grid: Sequence[Candidate], budget_s: float, need: int, lever_cand: Candidate | None, lever_time: float,
    measure: Callable[[list[Candidate], int], list[StepTiming]], clock: _FitClock,
    coverage: Callable[[Candidate], float] = lambda c: 1.0, reference: dict[Candidate, float] | None = None,
    fallback: _Fallback | None = None, lever_spread: dict[str, Any] | None = None,
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
        times[lever_cand] = _finite_or_none(lever_time)
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
                status[c] = (f"skipped: the cheaper {blocker.label} already cannot reach {need} samples in the "
                             "budget, so this one cannot either and has fewer samples per second")
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
            times[c] = _finite_or_none(t.seconds) if t.ok else None
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
                    times[c], spreads[c], own_levers[c] = _finite_or_none(t.seconds), t.spread(), fallback.pair
                    status[c] = f"measured at {pair} ({first} at {primary})"
                else:
                    status[c] = f"{first} at {primary}; {t.status} at {pair}"
    return [Measured(c, times[c], status[c], coverage(c), *own_levers.get(c, (None, None)), spreads.get(c))
            for c in grid]


def _fit_in_limit(cands: list[Candidate], est: dict[Candidate, float],
                  clock: _FitClock) -> tuple[list[Candidate], int, dict[Candidate, str]]:
    """The candidates (cheapest first by predicted step time ``est``) whose measurement fits what is left of
    the fit's time limit, their timed steps, and why each other one is left out. Without a limit: all of them."""
    if not clock.limited or not cands:
        return cands, clock.most_steps, {}
    kept: list[Candidate] = []
    for c in sorted(cands, key=lambda c: est[c]):
        if clock.steps_for([est[d] for d in (*kept, c)]) > 0:
            kept.append(c)
    steps = clock.steps_for([est[d] for d in kept]) if kept else 0
    return (kept, steps,
            {c: (f"its ~{est[c]:.2f} s steps do not fit what is left of the fit's {clock.max_seconds:.0f} s time "
                 "limit") for c in cands if c not in kept})


def _prediction(m: Measured, budget_s: float, need: int) -> dict[str, Any]:
    """The notes' per-candidate numbers: step time, iterations, samples, coverage, whole-image samples, converges."""
    if m.step_time_s is None:
        return {"step_time_s": None, "iterations": None, "samples": None, "samples_per_s": None,
                "patch_coverage": round(m.coverage, 4), "image_samples": None, "converges": False}
    return {"step_time_s": m.step_time_s, "iterations": m.iterations(budget_s), "samples": m.samples(budget_s),
            "samples_per_s": round(m.samples_per_second, 4), "patch_coverage": round(m.coverage, 4),
            "image_samples": m.image_samples(budget_s), "converges": m.samples(budget_s) >= need}


def _check_candidates(grid: Sequence[Candidate], template: NetworkPlan) -> None:
    if not grid:
        raise PlanError("no budget candidates given")
    problems = []
    for c in grid:
        net = c.network(template, template.precision)
        problems += net.check(f"candidate {c.label}")
    if len(set(grid)) != len(grid):
        problems.append("candidates contain duplicates")
    if problems:
        raise PlanError("invalid budget candidates:\n" + "\n".join(f"  - {p}" for p in problems))


def _filter_by_memory(
    grid: list[Candidate], template: NetworkPlan, plan: Plan, cin: int, k: int
) -> tuple[list[Candidate], dict[Candidate, str]]:
    """Drop candidates whose training step would not fit the plan's GPU memory budget (at fp16)."""
    keep, excluded = [], {}
    for c in grid:
        gb = _estimate_memory(c.network(template, "fp16"), cin, k, "cuda")
        if gb is not None and gb > plan.gpu_memory_gb:
            excluded[c] = f"excluded: needs ~{gb:.2f} GB > the {plan.gpu_memory_gb:g} GB GPU memory budget"
        else:
            keep.append(c)
    return keep, excluded


def _estimate_memory(net: NetworkPlan, cin: int, k: int, device: str) -> float | None:
    try:
        return round(float(estimate_training_memory_gb(net, cin, k, device=device)), 4)
    except TypeError:  # an estimator without the device argument
        return round(float(estimate_training_memory_gb(net, cin, k)), 4)


def _cand_dict_of(net: NetworkPlan) -> dict[str, Any]:
    return {"base_features": net.spec.base_features, "max_features": net.spec.max_features,
            "patch_size": list(net.patch_size), "batch_size": net.batch_size}


def _cand_dict(c: Candidate) -> dict[str, Any]:
    return {"base_features": c.base_features, "max_features": c.max_features, "patch_size": list(c.patch_size),
            "batch_size": c.batch_size}


def _finite_or_none(t: float) -> float | None:
    return (round(float(t), 6) or 1e-6) if (t is not None and math.isfinite(t) and t > 0) else None


__all__ = [
    "FIT_FRACTION",
    "patch_coverage",
    "MIN_SAMPLES",
    "USABLE_FRACTION",
    "Measured",
    "choose_candidate",
    "fit_plan_to_budget",
    "fit_seconds_limit",
    "scaled_step_time",
]
