"""Time real training steps of candidate networks on the training device (for :mod:`medseg.planning.budget`).

**Step time**: :func:`measure_step_time` builds the network, feeds a random ``(B, C, *patch)`` input
with random integer targets, and runs the reference training step of
:func:`medseg.planning.reference_step.training_step` (forward under autocast, soft Dice + cross-entropy over the
deep-supervision outputs with halving weights, backward, SGD Nesterov step): one warm-up step, then
``steps`` timed steps. :func:`measure_step_times` measures several settings interleaved, round-robin, so
that a changing machine load affects every setting alike.

**The statistic** is the *fastest* timed round of a setting, and the spread (rounds, min, median, max) is
kept beside it (:class:`StepTiming`). Another process on the cores only ever slows a step down, never
speeds it up (the reasoning of :mod:`timeit`, whose documentation recommends the minimum for the same
reason), so the fastest round is the step time of the machine without the intruder, while a median of 3
moves by the intruder's factor as soon as 2 of the 3 rounds overlap a busy moment (issue 42 saw it 2-3x
off on a briefly busy machine). While rounds are cheap, more of them are taken (up to :data:`MAX_ROUNDS`, as long as
the extra rounds keep the timed total under :data:`CHEAP_ROUNDS_SECONDS`), so a brief burst of load has
to cover more rounds to move the result. Settings are still compared round against round, interleaved.

**Native crashes**: the planner times its settings in a child process (:mod:`medseg.planning.step_child`)
so that a step that kills its process natively takes only the child along; the test-only fault point
``step_probe`` of :mod:`medseg.faults` (NAME: the precision) fires before each step.

**Throughput levers**: which ``(precision, channels_last)`` settings are worth timing on a device is
:func:`medseg.planning.levers.lever_settings`'s choice; this module times whatever settings it is given.

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

from medseg import faults
from medseg.machine import keep_freed_cpu_memory
from medseg.options import DeviceKind, Precision
from medseg.planning.plan import NetworkPlan
from medseg.planning.reference_step import make_optimizer, training_step

logger = logging.getLogger(__name__)

#: Timed steps per measurement when not given (the fewest rounds); one warm-up step comes first.
DEFAULT_MEASURE_STEPS = 3
WARMUP_STEPS = 1
#: Extra timed rounds are taken while the batch's timed total stays under this many seconds.
CHEAP_ROUNDS_SECONDS = 1.0
#: The most timed rounds a cheap batch gets.
MAX_ROUNDS = 9
MEASURED = "measured"
OUT_OF_MEMORY = "out of memory"


@dataclass(frozen=True)
class StepSetting:
    """What one measured training step runs: network (patch/batch inside), channels, device and levers."""

    net: NetworkPlan
    in_channels: int
    num_classes: int
    device: str = DeviceKind.CPU
    precision: str = Precision.FP32
    channels_last: bool = False


@dataclass(frozen=True)
class StepTiming:
    """What timing one setting gave.

    Attributes:
        seconds: seconds per training step, the fastest timed round (see the module docstring);
            ``math.inf`` when the setting ran out of memory or crashed its process.
        status: ``"measured"``, ``"out of memory"`` or ``"crashed (SIGSEGV)"`` (the signal or exit code
            that ended the measuring process).
        rounds: every timed step, in order (empty when not measured or given as one number).
    """

    seconds: float
    status: str = MEASURED
    rounds: tuple[float, ...] = ()

    @classmethod
    def from_rounds(cls, rounds: Sequence[float]) -> StepTiming:
        return cls(min(rounds), MEASURED, tuple(float(r) for r in rounds))

    @classmethod
    def from_seconds(cls, seconds: float) -> StepTiming:
        """One number (e.g. a ``measure_fn``): finite and positive is measured, anything else out of memory."""
        t = float(seconds)
        return cls(t) if math.isfinite(t) and t > 0 else cls(math.inf, OUT_OF_MEMORY)

    @property
    def ok(self) -> bool:
        return self.status == MEASURED and math.isfinite(self.seconds) and self.seconds > 0

    @property
    def crashed(self) -> bool:
        return self.status.startswith("crashed")

    def spread(self) -> dict[str, Any] | None:
        """``{"rounds", "min_s", "median_s", "max_s"}`` of the timed steps, or None without rounds."""
        if not self.rounds:
            return None
        return {
            "rounds": len(self.rounds),
            "min_s": round(min(self.rounds), 6),
            "median_s": round(statistics.median(self.rounds), 6),
            "max_s": round(max(self.rounds), 6),
        }


class _StepRunner:
    """A built model, optimizer and random batch, ready to run timed reference training steps."""

    def __init__(self, s: StepSetting, seed: int) -> None:
        self.setting = s
        self.device = torch.device(s.device)
        net = replace(s.net, precision=s.precision)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = net.build(s.in_channels, s.num_classes)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((net.batch_size, s.in_channels, *net.patch_size), generator=gen)
        target = torch.randint(0, s.num_classes, (net.batch_size, *net.patch_size), generator=gen)
        model = model.to(self.device).train()
        x, target = x.to(self.device), target.to(self.device)
        if s.channels_last:
            fmt = torch.channels_last_3d if net.dims == 3 else torch.channels_last
            model = model.to(memory_format=fmt)  # type: ignore[call-overload]  # accepted at run time; not in the stubs
            x = x.contiguous(memory_format=fmt)
        self.model, self.x, self.target = model, x, target
        self.optimizer = make_optimizer(model)

    def step(self) -> float:
        """Run one training step; return its wall time in seconds."""
        s = self.setting
        faults.maybe_fail("step_probe", s.precision)
        self._sync()
        t0 = time.perf_counter()
        training_step(self.model, self.optimizer, self.x, self.target, s.num_classes, s.precision)
        self._sync()
        return time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == DeviceKind.CUDA:
            torch.cuda.synchronize(self.device)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _check_counts(steps: int, warmup: int) -> None:
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}")


def _time_settings(
    settings: Sequence[StepSetting],
    steps: int,
    warmup: int,
    seed: int,
    progress: bool,
    cheap_seconds: float,
    mark: Callable[[int], None] = lambda i: None,
) -> list[StepTiming]:
    """Interleaved timing of ``settings`` in this process (see :func:`measure_step_times`); ``mark(i)`` is called
    before setting ``i`` is built or stepped, ``mark(-1)`` once all are done."""
    from medseg.progress import progress_bar

    if any(torch.device(s.device).type == DeviceKind.CPU for s in settings):
        keep_freed_cpu_memory()  # time the steps with the allocator setting the trainer uses
    runners: list[_StepRunner | None] = []
    times: list[list[float]] = [[] for _ in settings]
    oom: set[int] = set()
    bar = progress_bar(
        total=len(settings) * (warmup + steps),
        desc="timing training steps",
        unit="step",
        disable=not progress,
        leave=False,
    )

    def out_of_memory(i: int, exc: BaseException) -> None:
        if not _is_out_of_memory(exc):
            raise exc
        oom.add(i)
        times[i] = []
        _free(settings[i].device)

    def one_round() -> None:
        for i, runner in enumerate(runners):
            if runner is None:
                continue
            mark(i)
            try:
                times[i].append(runner.step())
            except Exception as exc:  # out of memory only; anything else is a real error
                runners[i] = None
                out_of_memory(i, exc)
            bar.update(1)

    try:
        for i, s in enumerate(settings):
            mark(i)
            runner: _StepRunner | None = None
            try:
                runner = _StepRunner(s, seed)
                for _ in range(warmup):
                    runner.step()
                    bar.update(1)
            except Exception as exc:
                runner = None
                out_of_memory(i, exc)
                bar.update(warmup)
            runners.append(runner)
        for _ in range(steps):
            one_round()
        rounds = steps
        while rounds < MAX_ROUNDS and any(r is not None for r in runners):
            spent = sum(sum(t) for t in times)
            next_round = sum(t[-1] for t, r in zip(times, runners) if r is not None and t)
            if spent + next_round > cheap_seconds:
                break
            bar.total += sum(r is not None for r in runners)
            one_round()
            rounds += 1
        mark(-1)
    finally:
        bar.close()
        runners.clear()
        gc.collect()
    return [
        StepTiming(math.inf, OUT_OF_MEMORY) if i in oom or not t else StepTiming.from_rounds(t)
        for i, t in enumerate(times)
    ]


def _log_timings(settings: Sequence[StepSetting], timings: Sequence[StepTiming]) -> None:
    for s, t in zip(settings, timings):
        if t.ok:
            spread = t.spread() or {}
            logger.info(
                "%s: %.4f s/step (fastest of %d; median %.4f s, slowest %.4f s)",
                _setting_label(s),
                t.seconds,
                spread.get("rounds", 1),
                spread.get("median_s", t.seconds),
                spread.get("max_s", t.seconds),
            )
        elif t.crashed:
            logger.warning(
                "%s: %s (the step killed its measuring process on %s); this setting is never chosen",
                _setting_label(s),
                t.status,
                s.device,
            )
        else:
            logger.warning("%s: %s on %s", _setting_label(s), t.status, s.device)


def measure_step_times(
    settings: Sequence[StepSetting],
    steps: int = DEFAULT_MEASURE_STEPS,
    *,
    warmup: int = WARMUP_STEPS,
    seed: int = 0,
    progress: bool = True,
    cheap_seconds: float = CHEAP_ROUNDS_SECONDS,
) -> list[float]:
    """Training-step time of several settings, measured interleaved (round robin), in this process.

    Every setting gets its model built and ``warmup`` untimed steps, then ``steps`` rounds each run one
    timed step of every setting in turn, so a machine whose load changes during the measurement slows
    every setting alike and their ratios stay fair; cheap batches get more rounds (see the module
    docstring). A step that crashes the process natively takes this process with it: the planner uses
    :func:`~medseg.planning.step_child.measure_in_child`.

    Args:
        settings: what to measure (all models are kept alive together; activations are not).
        steps: timed rounds per setting at least (the fastest is reported).
        warmup: untimed steps per setting first (memory allocation, kernel selection).
        seed: seed of the random weights, input ``(B, C, *patch)`` and integer targets ``(B, *patch)``.
        progress: show a tqdm progress bar.
        cheap_seconds: extra rounds (up to :data:`MAX_ROUNDS`) while the timed total stays under this; 0: none.

    Returns:
        Seconds per training step (the fastest timed round), one per setting; ``math.inf`` for a setting
        that ran out of memory.

    Raises:
        ValueError: ``steps < 1`` or ``warmup < 0``.
        ConfigError: a network that cannot be built.
    """
    _check_counts(steps, warmup)
    timings = _time_settings(settings, steps, warmup, seed, progress, cheap_seconds)
    _log_timings(settings, timings)
    return [t.seconds for t in timings]


def measure_step_time(
    net: NetworkPlan,
    in_channels: int,
    num_classes: int,
    device: str = DeviceKind.CPU,
    precision: str = Precision.FP32,
    channels_last: bool = False,
    steps: int = DEFAULT_MEASURE_STEPS,
    *,
    warmup: int = WARMUP_STEPS,
    seed: int = 0,
) -> float:
    """Wall time of one real training step of ``net`` on ``device`` (the fastest of the timed steps), in
    this process.

    Builds the network, a random input ``(B, C, *patch)`` float32 and random integer targets
    ``(B, *patch)``; each step runs the forward pass under autocast at ``precision``, soft Dice +
    cross-entropy over the deep-supervision outputs, backward and an SGD step
    (:func:`medseg.planning.reference_step.training_step`). ``warmup`` untimed steps, then at least ``steps``
    timed ones. ``torch.set_num_threads`` is left as it is.

    Args:
        net: network plan (patch, batch, topology; its ``precision`` is overridden by ``precision``).
        in_channels: input channels ``C``.
        num_classes: output classes ``K`` including background.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast dtype).
        channels_last: model and input in channels-last (3D: ``channels_last_3d``) memory format.
        steps: timed steps at least (the fastest is returned).

    Returns:
        Seconds per training step; ``math.inf`` when the step runs out of memory.
    """
    s = StepSetting(net, in_channels, num_classes, device, precision, channels_last)
    return measure_step_times([s], steps, warmup=warmup, seed=seed, progress=False)[0]


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == DeviceKind.CUDA:
        torch.cuda.empty_cache()


def _setting_label(s: StepSetting) -> str:
    return (
        f"{s.net.arch} {s.net.spec.base_features}f {'x'.join(map(str, s.net.patch_size))} b{s.net.batch_size} "
        f"{s.precision}{' channels-last' if s.channels_last else ''}"
    )


__all__ = [
    "DEFAULT_MEASURE_STEPS",
    "StepSetting",
    "StepTiming",
    "measure_step_time",
    "measure_step_times",
]
