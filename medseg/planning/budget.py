"""Fit a plan to the machine and the training time you have: measure candidate networks, keep the one
that learns most in the budget.

nnU-Net sizes a plan for a GPU and a 1000-epoch schedule (250k iterations, 500k patches at batch 2). On a
CPU, or with a deadline, that network finishes a few hundred iterations and has not converged. With a
time budget, :func:`fit_plan_to_budget` times a few real training steps of a small, fixed grid of
candidates on the training device and replaces the default network of one configuration with the
candidate that maximises what can be learned in the budget.

**Candidates** (:func:`default_candidates`), all with the planned topology (same kernels and strides):

* ``base_features`` in :data:`FEATURE_GRID` (16, 24, 32); ``max_features`` scaled by the same factor as
  the base (the planned 32/320 becomes 16/160);
* the planned patch; when it does not cover the median image (large images) also up to
  :data:`MAX_PATCH_HALVINGS` smaller patches, each halving the largest axis (rounded to the total
  stride, keeping a bottleneck of at least :data:`MIN_BOTTLENECK` voxels);
* batch sizes :data:`BATCH_GRID` (2 and 4 for 3D; never below 2).

**Throughput levers**, measured once on the lever candidate (the widest network, at the smallest patch
and the smallest batch: wide layers are where bf16 and channels-last pay or not, and the smallest batch
halves the cost of timing every setting on it), interleaved round-robin so that a changing machine load
affects every setting alike; the fastest setting is kept for every candidate:

* CPU: ``fp32``, plus ``bf16`` autocast when oneDNN has native bf16 kernels (AVX512-BF16 / AMX;
  without them bf16 runs on slow reference kernels and is not tried); channels-last on and off.
* CUDA: ``fp16`` AMP, plus ``bf16`` AMP where the GPU supports it; channels-last on and off.

**Step time**: :func:`measure_step_time` builds the network, feeds a random ``(B, C, *patch)`` input
with random integer targets, and runs the reference training step of
:func:`medseg.networks.memory.training_step` (forward under autocast, soft Dice + cross-entropy over the
deep-supervision outputs with halving weights, backward, SGD Nesterov step): one warm-up step, then the
median of ``steps`` timed steps. Thread settings are left as they are.

**Choice rule** (:func:`choose_candidate`):

* ``iterations(c) = floor(budget_seconds * USABLE_FRACTION / step_time(c))`` (10% of the budget is
  kept for validation and data loading hiccups), ``samples(c) = iterations(c) * batch(c)``.
* ``c`` *converges* when ``samples(c) >= MIN_SAMPLES`` (:data:`MIN_SAMPLES_3D` for 3D,
  :data:`MIN_SAMPLES_2D` for 2D configurations).
* Among converging candidates the largest ``capacity x context`` score wins, ``base_features x patch
  voxels``; ties (same width and patch, other batch) go to more samples.
* When none converges, the candidate with the most samples per second wins (it gets closest to
  convergence); ties go to the larger score.

Candidates are measured cheapest first, in waves; a candidate is skipped without measuring when a
cheaper one that *dominates* it (no more features, no larger patch on any axis, same batch) already
cannot converge: the skipped one is at least as slow per step, so it cannot converge either and has
fewer samples per second, and the rule could never choose it.

Everything measured, and why the winner won, is written to ``plan.notes["budget"]`` so that a person
reading ``plans.json`` can see the reasoning. The chosen channels-last setting is recorded there too
(``notes["budget"]["chosen"]["channels_last"]``); the precision goes into ``NetworkPlan.precision``.
Patch sizes are ``(Z, Y, X)`` (``(Y, X)`` for 2D), times in seconds.
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from medseg.errors import PlanError
from medseg.planning.plan import ConfigurationPlan, NetworkPlan, Plan

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
#: Widths tried (channels of the first stage).
FEATURE_GRID = (16, 24, 32)
#: Batch sizes tried, per number of spatial dimensions (never below 2: instance norm and the foreground
#: oversampling need two samples per batch).
BATCH_GRID = {3: (2, 4), 2: (16, 32)}
#: For images the planned patch does not cover: how many times the largest patch axis is halved.
MAX_PATCH_HALVINGS = 2
#: A halved patch axis keeps at least this many voxels at the bottleneck (patch / total stride).
MIN_BOTTLENECK = 2
#: Timed steps per measurement when not given; one warm-up step comes first.
DEFAULT_MEASURE_STEPS = 3
WARMUP_STEPS = 1

#: ``(net, in_channels, num_classes, device, precision, channels_last, steps) -> seconds per step``.
MeasureFn = Callable[[NetworkPlan, int, int, str, str, bool, int], float]


# ---------------------------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate:
    """One point of the grid: width, patch and batch (topology and options come from the planned network).

    Attributes:
        base_features: channels of the first stage.
        max_features: cap on channels per stage.
        patch_size: training patch ``(Z, Y, X)`` or ``(Y, X)``; divisible by the planned total stride.
        batch_size: training batch size.
    """

    base_features: int
    max_features: int
    patch_size: tuple[int, ...]
    batch_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(v) for v in self.patch_size))

    @property
    def patch_voxels(self) -> int:
        return math.prod(self.patch_size)

    @property
    def score(self) -> int:
        """Capacity x context: ``base_features * patch voxels``."""
        return self.base_features * self.patch_voxels

    @property
    def cost(self) -> int:
        """Proxy of the work of one step (for ordering only): ``base_features * patch voxels * batch``."""
        return self.score * self.batch_size

    @property
    def label(self) -> str:
        return f"{self.base_features}f {'x'.join(map(str, self.patch_size))} b{self.batch_size}"

    def dominates(self, other: Candidate) -> bool:
        """True when ``self`` is no more expensive than ``other`` in every respect at the same batch."""
        return (
            self != other
            and self.batch_size == other.batch_size
            and self.base_features <= other.base_features
            and self.max_features <= other.max_features
            and len(self.patch_size) == len(other.patch_size)
            and all(a <= b for a, b in zip(self.patch_size, other.patch_size))
        )

    def network(self, template: NetworkPlan, precision: str) -> NetworkPlan:
        """``template`` (topology, norm, options) with this candidate's width, patch, batch and precision."""
        return replace(
            template,
            base_features=self.base_features,
            max_features=self.max_features,
            patch_size=tuple(self.patch_size),
            batch_size=self.batch_size,
            precision=precision,
            estimated_memory_gb=None,
        )


def scaled_max_features(template: NetworkPlan, base_features: int) -> int:
    """``template.max_features`` scaled by ``base_features / template.base_features`` (at least the base)."""
    return max(base_features, int(round(template.max_features * base_features / template.base_features)))


def smaller_patches(net: NetworkPlan, median_shape: Sequence[float]) -> list[tuple[int, ...]]:
    """The planned patch, then up to :data:`MAX_PATCH_HALVINGS` halvings when it does not cover the image.

    Args:
        net: planned network (patch and strides).
        median_shape: median preprocessed image shape of the configuration, same axes as the patch
            (``(Z, Y, X)``, or ``(Y, X)`` for 2D).

    Returns:
        Patches ``(Z, Y, X)``/``(Y, X)``, largest first, each divisible by ``net.total_stride()``. Only the
        planned patch when it already covers the median image on every axis. Each halving takes the
        largest axis (in voxels) that can be halved to a multiple of the total stride keeping
        :data:`MIN_BOTTLENECK` voxels at the bottleneck.
    """
    patches = [tuple(int(p) for p in net.patch_size)]
    if all(p >= m for p, m in zip(net.patch_size, median_shape)):
        return patches
    ts = net.total_stride()
    for _ in range(MAX_PATCH_HALVINGS):
        cur = patches[-1]
        options = []
        for a in range(len(cur)):
            new = (cur[a] // 2) // ts[a] * ts[a]
            if new >= MIN_BOTTLENECK * ts[a] and new < cur[a]:
                options.append((cur[a], a, new))
        if not options:
            break
        _, axis, new = max(options)
        patches.append(tuple(new if i == axis else v for i, v in enumerate(cur)))
    return patches


def default_candidates(net: NetworkPlan, median_shape: Sequence[float]) -> list[Candidate]:
    """The documented grid for one planned network (see the module docstring).

    Args:
        net: the configuration's planned default network.
        median_shape: median preprocessed image shape, same axes as ``net.patch_size``.

    Returns:
        Candidates ordered by width, patch (largest first) and batch.
    """
    batches = BATCH_GRID[net.dims]
    return [
        Candidate(f, scaled_max_features(net, f), patch, b)
        for f in FEATURE_GRID
        for patch in smaller_patches(net, median_shape)
        for b in batches
    ]


# ---------------------------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class StepSetting:
    """What one measured training step runs: network (patch/batch inside), channels, device and levers."""

    net: NetworkPlan
    in_channels: int
    num_classes: int
    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = False


class _StepRunner:
    """A built model, optimizer and random batch, ready to run timed reference training steps."""

    def __init__(self, s: StepSetting, seed: int) -> None:
        from medseg.networks import build_network
        from medseg.networks.memory import make_optimizer

        self.setting = s
        self.device = torch.device(s.device)
        net = replace(s.net, precision=s.precision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_network(net, s.in_channels, s.num_classes)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((net.batch_size, s.in_channels, *net.patch_size), generator=gen)
        target = torch.randint(0, s.num_classes, (net.batch_size, *net.patch_size), generator=gen)
        model = model.to(self.device).train()
        x, target = x.to(self.device), target.to(self.device)
        if s.channels_last:
            fmt = torch.channels_last_3d if net.dims == 3 else torch.channels_last
            model = model.to(memory_format=fmt)
            x = x.contiguous(memory_format=fmt)
        self.model, self.x, self.target = model, x, target
        self.optimizer = make_optimizer(model)

    def step(self) -> float:
        """Run one training step; return its wall time in seconds."""
        from medseg.networks.memory import training_step

        s = self.setting
        self._sync()
        t0 = time.perf_counter()
        training_step(self.model, self.optimizer, self.x, self.target, s.num_classes, s.precision)
        self._sync()
        return time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def measure_step_times(
    settings: Sequence[StepSetting], steps: int = DEFAULT_MEASURE_STEPS, *, warmup: int = WARMUP_STEPS,
    seed: int = 0, progress: bool = True,
) -> list[float]:
    """Median training-step time of several settings, measured interleaved (round robin).

    Every setting gets its model built and ``warmup`` untimed steps, then ``steps`` rounds each run one
    timed step of every setting in turn, so a machine whose load changes during the measurement slows
    every setting alike and their ratios stay fair.

    Args:
        settings: what to measure (all models are kept alive together; activations are not).
        steps: timed steps per setting (median reported).
        warmup: untimed steps per setting first (memory allocation, kernel selection).
        seed: seed of the random weights, input ``(B, C, *patch)`` and integer targets ``(B, *patch)``.
        progress: show a tqdm progress bar.

    Returns:
        Seconds per training step, one per setting; ``math.inf`` for a setting that ran out of memory.

    Raises:
        ValueError: ``steps < 1`` or ``warmup < 0``.
        ConfigError: a network that cannot be built.
    """
    from tqdm.auto import tqdm

    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    if any(torch.device(s.device).type == "cpu" for s in settings):
        from medseg.networks.memory import keep_freed_cpu_memory

        keep_freed_cpu_memory()  # time the steps with the allocator setting the trainer uses
    runners: list[_StepRunner | None] = []
    times: list[list[float]] = [[] for _ in settings]
    bar = tqdm(total=len(settings) * (warmup + steps), desc="timing training steps", unit="step",
               disable=not progress, leave=False)
    try:
        for i, s in enumerate(settings):
            try:
                runner: _StepRunner | None = _StepRunner(s, seed)
                for _ in range(warmup):
                    runner.step()
                    bar.update(1)
            except Exception as exc:  # out of memory only; anything else is a real error
                if not _is_out_of_memory(exc):
                    raise
                logger.warning("%s: out of memory on %s (%s)", _setting_label(s), s.device, exc)
                runner = None
                times[i] = [math.inf]
                _free(s.device)
                bar.update(warmup)
            runners.append(runner)
        for _ in range(steps):
            for i, runner in enumerate(runners):
                if runner is not None:
                    try:
                        times[i].append(runner.step())
                    except Exception as exc:
                        if not _is_out_of_memory(exc):
                            raise
                        logger.warning("%s: out of memory on %s", _setting_label(settings[i]), settings[i].device)
                        runners[i] = None
                        times[i] = [math.inf]
                        _free(settings[i].device)
                bar.update(1)
    finally:
        bar.close()
        runners.clear()
        gc.collect()
    out = [statistics.median(t) for t in times]
    for s, t in zip(settings, out):
        logger.info("%s: %.4f s/step", _setting_label(s), t)
    return out


def measure_step_time(
    net: NetworkPlan, in_channels: int, num_classes: int, device: str = "cpu", precision: str = "fp32",
    channels_last: bool = False, steps: int = DEFAULT_MEASURE_STEPS, *, warmup: int = WARMUP_STEPS, seed: int = 0,
) -> float:
    """Median wall time of one real training step of ``net`` on ``device``.

    Builds the network, a random input ``(B, C, *patch)`` float32 and random integer targets
    ``(B, *patch)``; each step runs the forward pass under autocast at ``precision``, soft Dice +
    cross-entropy over the deep-supervision outputs, backward and an SGD step
    (:func:`medseg.networks.memory.training_step`). ``warmup`` untimed steps, then ``steps`` timed ones.
    ``torch.set_num_threads`` is left as it is.

    Args:
        net: network plan (patch, batch, topology; its ``precision`` is overridden by ``precision``).
        in_channels: input channels ``C``.
        num_classes: output classes ``K`` including background.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast dtype).
        channels_last: model and input in channels-last (3D: ``channels_last_3d``) memory format.
        steps: timed steps (median returned).

    Returns:
        Seconds per training step (median); ``math.inf`` when the step runs out of memory.
    """
    s = StepSetting(net, in_channels, num_classes, device, precision, channels_last)
    return measure_step_times([s], steps, warmup=warmup, seed=seed, progress=False)[0]


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _setting_label(s: StepSetting) -> str:
    return (f"{s.net.arch} {s.net.base_features}f {'x'.join(map(str, s.net.patch_size))} b{s.net.batch_size} "
            f"{s.precision}{' channels-last' if s.channels_last else ''}")


def cpu_bf16_supported() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def lever_settings(device: str) -> tuple[list[tuple[str, bool]], str]:
    """The ``(precision, channels_last)`` pairs worth measuring on ``device``, and why those.

    Returns:
        ``(pairs, reason)``.
    """
    if torch.device(device).type == "cuda":
        precisions = ["fp16"]
        bf16 = False
        try:
            bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        except (AssertionError, RuntimeError):
            bf16 = False
        if bf16:
            precisions.append("bf16")
        reason = "CUDA: automatic mixed precision (fp16" + (", bf16" if bf16 else "; no bf16 on this GPU") + ")"
    elif cpu_bf16_supported():
        precisions = ["fp32", "bf16"]
        reason = "CPU with native bf16 (oneDNN AVX512-BF16/AMX): fp32 and bf16 autocast"
    else:
        precisions = ["fp32"]
        reason = (f"CPU without native bf16 (capability {torch.backends.cpu.get_cpu_capability()}): bf16 would run "
                  "on slow reference kernels, so only fp32 is measured")
    return [(p, cl) for p in precisions for cl in (False, True)], reason + "; channels-last off and on"


# ---------------------------------------------------------------------------------------------- choosing
@dataclass(frozen=True)
class Measured:
    """A candidate with its measured step time (``None`` when skipped or out of memory) and status."""

    candidate: Candidate
    step_time_s: float | None
    status: str = "measured"

    def iterations(self, budget_seconds: float) -> int:
        if self.step_time_s is None:
            return 0
        return int(math.floor(budget_seconds * USABLE_FRACTION / self.step_time_s))

    def samples(self, budget_seconds: float) -> int:
        return self.iterations(budget_seconds) * self.candidate.batch_size

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
        raise PlanError("no budget candidate could be measured (all ran out of memory or were skipped)")
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
            f"{m.samples(budget_seconds)} samples.")
    return best, head + why


# ---------------------------------------------------------------------------------------------- the fit
def fit_plan_to_budget(
    plan: Plan,
    device: str,
    minutes: float,
    *,
    configuration: str | None = None,
    candidates: list[Candidate] | None = None,
    measure_steps: int = DEFAULT_MEASURE_STEPS,
    seed: int = 0,
    measure_fn: MeasureFn | None = None,
) -> Plan:
    """Replace one configuration's default network by the candidate that learns most in ``minutes``.

    Args:
        plan: a validated plan (e.g. from :func:`medseg.planning.planner.plan_dataset`).
        device: ``"cpu"`` or ``"cuda"``: where training will run; the measurement runs there.
        minutes: training time budget in minutes.
        configuration: configuration to fit (default: the plan's default configuration); it becomes the
            plan's default configuration. Other configurations are kept as they were.
        candidates: grid to measure (default :func:`default_candidates` of the planned network); every
            patch must be divisible by the planned network's total stride.
        measure_steps: timed steps per measurement (median used), after one warm-up step.
        seed: seed of the random weights and data used for the measurement.
        measure_fn: replaces the real measurement (tests, cached tables): called as
            ``measure_fn(net, in_channels, num_classes, device, precision, channels_last, steps)`` per
            setting, returning seconds per step (``math.inf`` = out of memory). Default: interleaved real
            measurement (:func:`measure_step_times`).

    Returns:
        A new validated :class:`Plan` (``dataclasses.replace``): the configuration's default network has
        the chosen width, patch, batch and precision (and a fresh memory estimate), the configuration's
        ``patch_size``/``batch_size`` match it, ``time_budget_minutes=minutes``, ``device=device``,
        ``default_configuration=configuration``, and ``notes["budget"]`` records every candidate's measured
        step time, precision, channels-last, predicted iterations and samples, and the reasoning.

    Raises:
        PlanError: bad budget, device, configuration or candidates; CUDA asked for but not available;
            no candidate could be measured.
    """
    t_start = time.perf_counter()
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
    if device == "cuda" and measure_fn is None and not torch.cuda.is_available():
        raise PlanError(
            "cannot fit the plan to a CUDA time budget: no CUDA device is available here to measure on; "
            "plan on the training machine, or use --device cpu"
        )
    cfg_name = configuration or plan.default_configuration
    cfg = plan.configuration(cfg_name)
    template = cfg.network()
    median = tuple(cfg.median_shape[-cfg.dims:])
    grid = list(candidates) if candidates is not None else default_candidates(template, median)
    _check_candidates(grid, template)
    budget_s = float(minutes) * 60.0
    cin, k = plan.num_channels, plan.num_classes
    need = MIN_SAMPLES[cfg.dims]
    excluded: dict[Candidate, str] = {}

    if device == "cuda":
        grid, excluded = _filter_by_memory(grid, template, plan, cin, k)
        if not grid:
            raise PlanError(
                f"no budget candidate of {cfg_name} fits {plan.gpu_memory_gb} GB of GPU memory; raise --gpu-memory-gb"
            )

    def measure(settings: list[StepSetting]) -> list[float]:
        if measure_fn is not None:
            return [float(measure_fn(s.net, s.in_channels, s.num_classes, s.device, s.precision, s.channels_last,
                                     measure_steps)) for s in settings]
        return measure_step_times(settings, measure_steps, seed=seed)

    def setting(c: Candidate, precision: str, channels_last: bool) -> StepSetting:
        return StepSetting(c.network(template, precision), cin, k, device, precision, channels_last)

    precision, channels_last, lever_cand, lever_time, lever_notes = _measure_levers(grid, device, setting, measure)
    measured = _measure_grid(grid, budget_s, need, lever_cand, lever_time,
                             lambda cs: measure([setting(c, precision, channels_last) for c in cs]))
    best_i, reasoning = choose_candidate(measured, budget_s, cfg.dims)
    chosen = measured[best_i]
    new_net = chosen.candidate.network(template, precision)
    new_net = replace(new_net, estimated_memory_gb=_estimate_memory(new_net, cin, k, device))
    new_cfg: ConfigurationPlan = replace(
        cfg,
        networks={**cfg.networks, cfg.default_arch: new_net},
        patch_size=new_net.patch_size,
        batch_size=new_net.batch_size,
    )
    levers = {"precision": precision, "channels_last": channels_last}
    rows = [{**_cand_dict(m.candidate), **levers, **_prediction(m, budget_s, need), "score": m.candidate.score,
             "status": m.status} for m in measured]
    rows += [{**_cand_dict(c), **levers, **_prediction(Measured(c, None), budget_s, need), "score": c.score,
              "status": why} for c, why in excluded.items()]
    notes = {
        "device": device,
        "minutes": float(minutes),
        "configuration": cfg_name,
        "arch": cfg.default_arch,
        "replaced": {"base_features": template.base_features, "max_features": template.max_features,
                     "patch_size": list(template.patch_size), "batch_size": template.batch_size,
                     "precision": template.precision},
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "measure_steps": measure_steps,
        "rule": (f"iterations = floor(budget_s x {USABLE_FRACTION} / step_time_s); converging when iterations x "
                 f"batch >= {need}; among converging candidates the largest base_features x patch voxels, ties to "
                 "more samples; when none converges the most samples per second"),
        "levers": lever_notes,
        "candidates": rows,
        "chosen": {**_cand_dict(chosen.candidate), **levers, **_prediction(chosen, budget_s, need)},
        "reasoning": lever_notes["reason"] + " " + reasoning,
        "measure_seconds": round(time.perf_counter() - t_start, 2),
    }
    logger.info("budget fit of %s: %s", cfg_name, notes["reasoning"])
    new_plan = replace(
        plan,
        configurations={**plan.configurations, cfg_name: new_cfg},
        default_configuration=cfg_name,
        device=device,
        time_budget_minutes=float(minutes),
        notes={**plan.notes, "budget": notes},
    )
    return new_plan.validate()


def _measure_levers(
    grid: Sequence[Candidate], device: str, setting: Callable[[Candidate, str, bool], StepSetting],
    measure: Callable[[list[StepSetting]], list[float]],
) -> tuple[str, bool, Candidate, float, dict[str, Any]]:
    """Time every lever setting on the lever candidate (widest, smallest patch, smallest batch); keep the fastest.

    Returns:
        ``(precision, channels_last, lever candidate, its step time at the chosen setting, notes)``.
    """
    pairs, options = lever_settings(device)
    cand = max(grid, key=lambda c: (c.base_features, c.max_features, -c.patch_voxels, -c.batch_size))
    times = measure([setting(cand, p, cl) for p, cl in pairs])
    finite = [(t, i) for i, t in enumerate(times) if math.isfinite(t) and t > 0]
    if not finite:
        raise PlanError(f"{cand.label} could not be measured on {device} with any precision (out of memory?)")
    best_t, best_i = min(finite)
    precision, channels_last = pairs[best_i]
    parts = [f"{p}{' channels-last' if cl else ''} {t:.3f} s" if math.isfinite(t) else f"{p} out of memory"
             for (p, cl), t in zip(pairs, times)]
    notes = {
        "measured_on": _cand_dict(cand),
        "options": options,
        "results": [{"precision": p, "channels_last": cl, "step_time_s": _finite_or_none(t)}
                    for (p, cl), t in zip(pairs, times)],
        "chosen": {"precision": precision, "channels_last": channels_last},
        "reason": (f"Levers measured on {cand.label}: " + ", ".join(parts) + f"; kept the fastest, {precision} "
                   f"with channels-last {'on' if channels_last else 'off'}, for every candidate."),
    }
    return precision, channels_last, cand, best_t, notes


def _measure_grid(
    grid: Sequence[Candidate], budget_s: float, need: int, lever_cand: Candidate, lever_time: float,
    measure: Callable[[list[Candidate]], list[float]],
) -> list[Measured]:
    """Measure the grid cheapest first, in waves, skipping what a non-converging cheaper candidate dominates.

    A wave holds the pending candidates that no other pending one dominates; each wave is measured together
    (interleaved). Returns one :class:`Measured` per grid candidate, in grid order.
    """
    times: dict[Candidate, float | None] = {lever_cand: _finite_or_none(lever_time)}
    status: dict[Candidate, str] = {lever_cand: "measured (lever candidate)"}

    def fails(c: Candidate) -> bool:
        t = times.get(c)
        return t is not None and Measured(c, t).samples(budget_s) < need

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
        for c, t in zip(wave, measure(wave) if wave else []):
            times[c] = _finite_or_none(t)
            status[c] = "measured" if times[c] is not None else "out of memory"
            pending.remove(c)
    return [Measured(c, times[c], status[c]) for c in grid]


def _prediction(m: Measured, budget_s: float, need: int) -> dict[str, Any]:
    """The notes' per-candidate numbers: step time, iterations, samples, samples/s, converges."""
    if m.step_time_s is None:
        return {"step_time_s": None, "iterations": None, "samples": None, "samples_per_s": None, "converges": False}
    return {"step_time_s": m.step_time_s, "iterations": m.iterations(budget_s), "samples": m.samples(budget_s),
            "samples_per_s": round(m.samples_per_second, 4), "converges": m.samples(budget_s) >= need}


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
    from medseg.networks.memory import estimate_training_memory_gb

    try:
        return round(float(estimate_training_memory_gb(net, cin, k, device=device)), 4)
    except TypeError:  # an estimator without the device argument
        return round(float(estimate_training_memory_gb(net, cin, k)), 4)


def _cand_dict(c: Candidate) -> dict[str, Any]:
    return {"base_features": c.base_features, "max_features": c.max_features, "patch_size": list(c.patch_size),
            "batch_size": c.batch_size}


def _finite_or_none(t: float) -> float | None:
    return (round(float(t), 6) or 1e-6) if (t is not None and math.isfinite(t) and t > 0) else None


__all__ = [
    "BATCH_GRID",
    "FEATURE_GRID",
    "MIN_SAMPLES",
    "USABLE_FRACTION",
    "Candidate",
    "Measured",
    "StepSetting",
    "choose_candidate",
    "default_candidates",
    "fit_plan_to_budget",
    "measure_step_time",
    "measure_step_times",
]
