"""Time real training steps of candidate networks on the training device (for :mod:`medseg.planning.budget`).

**Step time**: :func:`measure_step_time` builds the network, feeds a random ``(B, C, *patch)`` input
with random integer targets, and runs the reference training step of
:func:`medseg.networks.memory.training_step` (forward under autocast, soft Dice + cross-entropy over the
deep-supervision outputs with halving weights, backward, SGD Nesterov step): one warm-up step, then the
median of ``steps`` timed steps. Thread settings are left as they are.
:func:`measure_step_times` measures several settings interleaved, round-robin, so that a changing machine
load affects every setting alike.

**Throughput levers** (:func:`lever_settings`): the ``(precision, channels_last)`` settings worth timing on
a device:

* CPU: ``fp32``, plus ``bf16`` autocast when oneDNN has native bf16 kernels (AVX512-BF16 / AMX;
  without them bf16 runs on slow reference kernels and is not tried); channels-last on and off.
* CUDA: ``fp16`` AMP, plus ``bf16`` AMP where the GPU supports it; channels-last on and off.

Patch sizes are ``(Z, Y, X)`` (``(Y, X)`` for 2D), times in seconds.
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from medseg.planning.plan import NetworkPlan

logger = logging.getLogger(__name__)

#: Timed steps per measurement when not given; one warm-up step comes first.
DEFAULT_MEASURE_STEPS = 3
WARMUP_STEPS = 1


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


__all__ = [
    "DEFAULT_MEASURE_STEPS",
    "StepSetting",
    "cpu_bf16_supported",
    "lever_settings",
    "measure_step_time",
    "measure_step_times",
]
