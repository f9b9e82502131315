"""Where and how a run computes: device, precision, memory format, CPU threads and data workers.

Defaults follow the machine (cores available to the process, native bf16 on the CPU, CUDA) and what
a time-budget plan measured fastest on this kind of device; :class:`ThreadTuner` keeps re-checking the
number of intra-op threads while training on the CPU. :func:`checked_precision` makes sure a CPU run's
reduced precision does not crash the process before the run relies on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from medseg.distributed import DistContext
from medseg.errors import ConfigError
from medseg.machine import cpu_has_fast_bf16, keep_freed_cpu_memory
from medseg.options import DeviceKind, Precision, parse_option
from medseg.planning.plan import NetworkPlan
from medseg.planning.stage import Stage
from medseg.planning.step_child import probe_step_in_child
from medseg.planning.step_timing import StepSetting
from medseg.training.config import TrainConfig

logger = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device, planned: str | None = None) -> str:
    """Turn ``auto`` into ``fp32``/``bf16``/``fp16`` for ``device``; check explicit choices.

    ``auto``: the precision the plan measured as fastest on this kind of device (``planned``, from a
    time-budget plan), where it is usable; else CUDA -> fp16 AMP, CPU -> bf16 when the CPU has native
    bf16, fp32 otherwise.

    Raises:
        ConfigError: an unknown precision, fp16 on the CPU (use bf16), or bf16 on a GPU without bf16 support.
    """
    return _resolve_precision(parse_option(Precision, precision, "precision"), device, planned).value


def _resolve_precision(precision: Precision, device: torch.device, planned: str | None) -> Precision:
    """:func:`resolve_precision` on a parsed precision (the public one returns the plain string checkpoints store)."""
    if precision == Precision.AUTO:
        if device.type == DeviceKind.CUDA:
            if planned == Precision.BF16 and torch.cuda.is_bf16_supported():
                return Precision.BF16
            return Precision.FP16
        if planned == Precision.FP32:
            return Precision.FP32
        return Precision.BF16 if cpu_has_fast_bf16() else Precision.FP32
    if precision == Precision.FP16 and device.type == DeviceKind.CPU:
        raise ConfigError("precision fp16 needs a CUDA device; on the CPU use bf16 (or fp32)")
    if precision == Precision.BF16 and device.type == DeviceKind.CUDA and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use --precision fp16 or fp32")
    if precision == Precision.BF16 and device.type == DeviceKind.CPU and not cpu_has_fast_bf16():
        logger.warning(
            "this CPU has no native bf16 (AVX512-BF16/AMX): bf16 autocast is emulated and usually "
            "much slower than fp32; consider --precision fp32"
        )
    return precision


def checked_precision(
    precision: str,
    channels_last: bool,
    net: NetworkPlan,
    in_channels: int,
    num_classes: int,
    device: torch.device,
    dist_ctx: DistContext,
    seed: int = 0,
) -> tuple[str, dict[str, Any] | None]:
    """The precision a run trains at once a reduced precision on the CPU has shown that its step does not crash.

    A training step can kill its process natively, beyond any ``try`` (issue 42: torch 2.13's oneDNN bf16
    backward at 12x256x256 on a CPU with AMX dies of SIGSEGV, fp32 does not). A CPU run at bf16 (or fp16) therefore first
    runs one training step of its network, patch, batch (this rank's share), precision and memory format in
    a child process (:func:`medseg.planning.step_child.probe_step_in_child`; a few seconds: the child's
    start, building the network, one step). When the child crashes (on any rank) the run trains in fp32,
    with a warning. fp32 and CUDA runs are not checked (no such crash is known there, and the check would
    slow every run).

    Args:
        precision: the run's resolved precision (``fp32``, ``bf16``, ``fp16``).
        channels_last: the run's memory format.
        net: the network the run trains, with this rank's batch size.
        in_channels / num_classes: the network's input channels and output classes.
        device: the run's device.
        dist_ctx: the run's processes (a crash on one rank makes every rank fall back).
        seed: seed of the check's random weights and batch.

    Returns:
        ``(precision to train at, record)``: the record (``RunRecord.precision_check``: precision, channels_last,
        status, seconds, threads, and ``fallback: "fp32"`` after a crash) is None when nothing was checked.
    """
    if device.type != "cpu" or precision == "fp32":
        return precision, None
    t0 = time.perf_counter()
    timing = probe_step_in_child(StepSetting(net, in_channels, num_classes, "cpu", precision, channels_last), seed=seed)
    crashes = dist_ctx.all_reduce_sum(torch.tensor([1.0 if timing.crashed else 0.0], dtype=torch.float64))
    record: dict[str, Any] = {
        "precision": precision,
        "channels_last": channels_last,
        "status": timing.status,
        "seconds": round(time.perf_counter() - t0, 2),
        "threads": torch.get_num_threads(),
    }
    if timing.ok:
        record["step_time_s"] = round(timing.seconds, 4)
    if float(crashes.item()) == 0:
        logger.info(
            "a %s training step of this run ran in a check process (%.1f s): training at %s",
            precision,
            record["seconds"],
            precision,
        )
        return precision, record
    if not timing.crashed:
        record["status"] = "crashed on another rank"
    record["fallback"] = "fp32"
    logger.warning(
        "a %s%s training step of this run's network (patch %s, batch %d) %s its check process: this "
        "build of torch cannot train it at %s on this CPU, so the run trains in fp32 (run_record.json: "
        "precision_check)",
        precision,
        " channels-last" if channels_last else "",
        "x".join(map(str, net.patch_size)),
        net.batch_size,
        record["status"],
        precision,
    )
    return "fp32", record


def default_num_threads(world_size: int = 1) -> int:
    """CPU cores available to this process divided among the ranks of this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, world_size))


def default_num_workers(device: torch.device, world_size: int = 1) -> int:
    """Background batch producers per process.

    None on CPUs with at most two cores per process: there one augmented sample costs about 1-2 % of
    the network's step, and a worker process would preempt the training threads, which stall each
    other when one of them is descheduled. Otherwise about one worker per four cores (CPU training
    gives the workers cores of their own, see :func:`default_num_threads`), and up to 8 next to a GPU.
    """
    cores = max(1, default_num_threads(1) // max(1, world_size))
    if device.type == "cuda":
        return max(1, min(8, cores - 1))
    if cores <= 2:
        return 0
    return max(1, min(4, cores // 4))


def prepare_device(cfg: TrainConfig, dist_ctx: DistContext) -> tuple[torch.device, int, int, ThreadTuner]:
    """The run's device, data workers, intra-op threads and thread tuner; seeds torch and numpy with ``cfg.seed``
    and sets the deterministic / cuDNN benchmark switches ``cfg`` asks for."""
    device = resolve_device(cfg.device, dist_ctx)
    num_workers, num_threads = workers_and_threads(cfg, device, dist_ctx.world_size)
    if device.type == "cpu":
        keep_freed_cpu_memory()  # activations reuse freed memory instead of faulting in fresh pages
    tuner = ThreadTuner(
        num_threads,
        enabled=cfg.num_threads is None and not cfg.deterministic and device.type == "cpu" and not dist_ctx.enabled,
    )
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    return device, num_workers, num_threads, tuner


def channels_last_format(dims: int) -> torch.memory_format:
    return torch.channels_last_3d if dims == 3 else torch.channels_last


def resolve_device(requested: str, dist_ctx: DistContext) -> torch.device:
    """The torch device of this process: plain ``cuda`` becomes ``cuda:<local rank>`` in a DDP run.

    Raises:
        ConfigError: CUDA was requested but no CUDA device is available.
    """
    if requested.startswith("cuda") and dist_ctx.enabled and requested == "cuda":
        requested = f"cuda:{dist_ctx.local_rank}"
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but no CUDA device is available; use --device cpu")
    return device


def workers_and_threads(cfg: TrainConfig, device: torch.device, world_size: int) -> tuple[int, int]:
    """``(data workers, intra-op threads)`` of a run: the configuration's, else the machine's defaults.

    On a CPU with more than two cores the data workers get cores of their own.
    """
    num_workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(device, world_size)
    threads = default_num_threads(world_size if device.type == "cpu" else 1)
    if device.type == "cpu" and threads > 2:
        threads = max(2, threads - num_workers)  # the data workers get cores of their own
    return num_workers, cfg.num_threads or threads


def planned_precision_and_layout(cfg: TrainConfig, stage: Stage, device: torch.device) -> tuple[str, bool]:
    """``(precision, channels_last)`` of a run on ``device``.

    A time-budget plan records the precision and memory format it measured fastest on its device;
    they are used for ``auto`` / unset settings when the run trains on the same kind of device.
    Otherwise channels_last is on for the CPU and off for GPUs.

    Raises:
        ConfigError: an explicit precision the device cannot use (see :func:`resolve_precision`).
    """
    plan, configuration = stage.plan, stage.config_name
    budget_notes = plan.notes.get("budget") if isinstance(plan.notes, dict) else None
    measured_here = (
        isinstance(budget_notes, dict)
        and budget_notes.get("configuration") == configuration
        and str(budget_notes.get("device", plan.device)).split(":")[0] == device.type
    )
    planned_precision = stage.precision if plan.device.split(":")[0] == device.type else None
    precision = resolve_precision(cfg.precision, device, planned_precision)
    planned_cl = (
        (budget_notes.get("chosen") or {}).get("channels_last")
        if measured_here and isinstance(budget_notes, dict)
        else None
    )
    if cfg.channels_last is not None:
        channels_last = cfg.channels_last
    elif isinstance(planned_cl, bool):
        channels_last = planned_cl
    else:
        channels_last = device.type == "cpu"
    return precision, channels_last


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``amp_dtype`` on ``device``; a no-op for float32 (``amp_dtype`` None)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def to_device(
    x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (images ``x``, labels ``y``) on ``device``; ``x`` in channels_last when asked, ``y`` as long."""
    non_blocking = device.type == "cuda"
    x = x.to(device, non_blocking=non_blocking)
    if channels_last:
        x = x.contiguous(memory_format=channels_last_format(x.dim() - 2))
    return x, y.to(device, non_blocking=non_blocking).long()


class ThreadTuner:
    """Chooses the number of intra-op threads that makes training steps fastest, and keeps checking.

    With all cores of a machine to itself, one thread per core is fastest. When other processes share
    the cores, threads that synchronise after every operation wait for each other to be scheduled and
    a step can take many times longer than with a single thread. The tuner times steps at ``max_threads``
    and at 1 thread (and half of ``max_threads`` on larger machines), keeps the fastest, and re-measures
    the alternatives every ``probe_every`` steps (doubling the interval while the choice stands).

    Args:
        max_threads: the most threads to use (the cores of the process).
        enabled: False pins ``max_threads``.
    """

    def __init__(self, max_threads: int, enabled: bool = True, probe_every: int = 50) -> None:
        self.max_threads = max(1, max_threads)
        self.options = sorted({self.max_threads, 1, max(1, self.max_threads // 2)}, reverse=True)
        self.enabled = enabled and len(self.options) > 1
        self.current = self.max_threads
        self.base_interval = probe_every
        self.interval = probe_every
        self.times: dict[int, list[float]] = {n: [] for n in self.options}
        self.queue: list[int] = []  # thread counts of the next probe steps
        self.steps = 0
        self.next_probe = 1  # first exploration right after the warm-up step
        self.probing: int | None = None
        torch.set_num_threads(self.current)

    def before_step(self) -> None:
        if not self.enabled:
            return
        if not self.queue and self.steps >= self.next_probe:
            others = [n for n in self.options if n != self.current]
            reps = 3 if self.next_probe == 1 else 2
            self.queue = [n for n in others for _ in range(reps)] + [self.current] * reps
            for n in self.options:
                self.times[n] = []
        self.probing = self.queue.pop(0) if self.queue else None
        want = self.probing if self.probing is not None else self.current
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def after_step(self, seconds: float) -> None:
        self.steps += 1
        if not self.enabled or self.probing is None:
            return
        self.times[self.probing].append(seconds)
        if self.queue:
            return
        medians = {n: statistics.median(t) for n, t in self.times.items() if t}
        best = min(medians, key=medians.__getitem__)
        logger.debug(
            "thread probe at step %d: %s",
            self.steps,
            ", ".join(f"{n} thread(s) {m:.3f} s" for n, m in sorted(medians.items())),
        )
        if best != self.current and medians[best] < 0.9 * medians[self.current]:
            logger.info(
                "intra-op threads: %d -> %d (step %.2f s vs %.2f s; the cores are shared with other work)"
                if best < self.current
                else "intra-op threads: %d -> %d (step %.2f s vs %.2f s)",
                self.current,
                best,
                medians[best],
                medians[self.current],
            )
            self.current = best
            self.interval = self.base_interval
        else:
            self.interval = min(self.interval * 2, 32 * self.base_interval)
        self.next_probe = self.steps + self.interval
        self.probing = None
        torch.set_num_threads(self.current)
