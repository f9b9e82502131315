"""The training loop: one :class:`Trainer` per run folder.

Per iteration: fetch batch ``i`` (produced in the background), forward under autocast, deep-supervised
Dice + CE loss in float32, backward (gradient scaling for CUDA fp16), gradient clipping, optimizer step
with the learning rate of the schedule at the current progress. Per epoch: pseudo Dice on held-out
patches (EMA -> ``checkpoint_best``), ``checkpoint_latest``, log line, ``progress.json`` and
``training_curves.png``. At the end: ``checkpoint_final`` and the sliding-window validation of the
held-out cases (:mod:`medseg.training.validation`).

Time budgets: the whole run (loading, training, per-epoch validation and the final validation, whose
duration is estimated from measured forward times and reserved) fits the budget; the learning rate
follows the schedule over elapsed training time, so training always ends annealed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from medseg.errors import CheckpointError, ConfigError
from medseg.io.image import atomic_write_bytes, atomic_write_text
from medseg.inference.sliding_window import shifted_shape, tta_variants
from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.training.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
)
from medseg.training.config import AugmentationConfig, TrainConfig
from medseg.training.data import PatchSampler, batch_iterator, load_training_cases, single_threaded
from medseg.training.distributed import DistContext
from medseg.training.losses import DeepSupervisionLoss, DiceCELoss, hard_dice_counts
from medseg.training.schedule import lr_factor

logger = logging.getLogger(__name__)

#: Epochs of an epoch-based run when neither the configuration nor a time budget says otherwise.
DEFAULT_EPOCHS = 1000


# ---------------------------------------------------------------------- device / precision helpers
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX through oneDNN).

    Without it, bf16 autocast is emulated and many times slower than float32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def resolve_precision(precision: str, device: torch.device, planned: str | None = None) -> str:
    """Turn ``auto`` into ``fp32``/``bf16``/``fp16`` for ``device``; check explicit choices.

    ``auto``: the precision the plan measured as fastest on this kind of device (``planned``, from a
    time-budget plan), where it is usable; else CUDA -> fp16 AMP, CPU -> bf16 when the CPU has native
    bf16, fp32 otherwise.

    Raises:
        ConfigError: fp16 on the CPU (use bf16), or bf16 on a GPU without bf16 support.
    """
    if precision == "auto":
        if device.type == "cuda":
            if planned == "bf16" and torch.cuda.is_bf16_supported():
                return "bf16"
            return "fp16"
        if planned == "fp32":
            return "fp32"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision fp16 needs a CUDA device; on the CPU use bf16 (or fp32)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use --precision fp16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        logger.warning("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 autocast is emulated and usually "
                       "much slower than fp32; consider --precision fp32")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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


def channels_last_format(dims: int) -> torch.memory_format:
    return torch.channels_last_3d if dims == 3 else torch.channels_last


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def num_tiles(size: int, patch: int, step: float) -> int:
    """Sliding-window positions along one axis (the volume is padded to the patch when smaller)."""
    if size <= patch:
        return 1
    return int(math.ceil((size - patch) / (patch * step))) + 1


def resolve_mirror_axes(aug: AugmentationConfig, cfg_plan: ConfigurationPlan) -> tuple[int, ...] | None:
    """Patch axes a run mirrors: ``aug.mirror_axes`` when set (checked against the patch), else the plan's.

    Raises:
        ConfigError: an axis outside the configuration's patch.
    """
    if aug.mirror_axes is None:
        return cfg_plan.mirror_axes
    axes = tuple(sorted(set(int(a) for a in aug.mirror_axes)))
    bad = [a for a in axes if not 0 <= a < cfg_plan.dims]
    if bad:
        raise ConfigError(f"augmentation.mirror_axes {list(aug.mirror_axes)}: axes {bad} are not axes of the "
                          f"{cfg_plan.dims}D patch of configuration {cfg_plan.name!r} (0..{cfg_plan.dims - 1})")
    return axes


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
        best = min(medians, key=medians.get)
        logger.debug("thread probe at step %d: %s", self.steps,
                     ", ".join(f"{n} thread(s) {m:.3f} s" for n, m in sorted(medians.items())))
        if best != self.current and medians[best] < 0.9 * medians[self.current]:
            logger.info("intra-op threads: %d -> %d (step %.2f s vs %.2f s; the cores are shared with other work)"
                        if best < self.current else "intra-op threads: %d -> %d (step %.2f s vs %.2f s)",
                        self.current, best, medians[best], medians[self.current])
            self.current = best
            self.interval = self.base_interval
        else:
            self.interval = min(self.interval * 2, 32 * self.base_interval)
        self.next_probe = self.steps + self.interval
        self.probing = None
        torch.set_num_threads(self.current)


# ---------------------------------------------------------------------- the trainer
class Trainer:
    """Trains one network of one configuration on one fold; see the module docstring.

    Args:
        work_dir: the work folder (plans, preprocessed data, splits, runs).
        plan: the plan (already validated).
        cfg: resolved configuration (``configuration`` and ``arch`` set).
        run_dir: the run folder.
        dist_ctx: distributed context (single process by default).
        checkpoint: a loaded ``checkpoint_latest`` to continue from, or None for a fresh run.
        train_ids / val_ids: the fold's training and held-out cases.
    """

    def __init__(self, work_dir: Path, plan: Plan, cfg: TrainConfig, run_dir: Path, dist_ctx: DistContext,
                 train_ids: list[str], val_ids: list[str], checkpoint: dict[str, Any] | None = None) -> None:
        self.session_start = time.perf_counter()
        self.work_dir, self.run_dir, self.cfg, self.dist = Path(work_dir), Path(run_dir), cfg, dist_ctx
        self.train_ids, self.val_ids = list(train_ids), list(val_ids)
        assert cfg.configuration is not None and cfg.arch is not None
        self.configuration, self.arch = cfg.configuration, cfg.arch

        # -------- device, threads, determinism
        device = cfg.device
        if device.startswith("cuda") and dist_ctx.enabled and device == "cuda":
            device = f"cuda:{dist_ctx.local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda was requested but no CUDA device is available; use --device cpu")
        self.num_workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(self.device, dist_ctx.world_size)
        threads = default_num_threads(dist_ctx.world_size if self.device.type == "cpu" else 1)
        if self.device.type == "cpu" and threads > 2:
            threads = max(2, threads - self.num_workers)  # the data workers get cores of their own
        self.num_threads = cfg.num_threads or threads
        if self.device.type == "cpu":
            from medseg.networks.memory import keep_freed_cpu_memory

            keep_freed_cpu_memory()  # activations reuse freed memory instead of faulting in fresh pages
        self.thread_tuner = ThreadTuner(self.num_threads, enabled=cfg.num_threads is None and not cfg.deterministic
                                        and self.device.type == "cpu" and not dist_ctx.enabled)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)

        # a time-budget plan records the precision and memory format it measured fastest on its device
        cfg_plan = plan.configuration(self.configuration)
        budget_notes = plan.notes.get("budget") if isinstance(plan.notes, dict) else None
        measured_here = (isinstance(budget_notes, dict) and budget_notes.get("configuration") == self.configuration
                         and str(budget_notes.get("device", plan.device)).split(":")[0] == self.device.type)
        planned_precision = cfg_plan.network(self.arch).precision if plan.device.split(":")[0] == self.device.type else None
        self.precision = resolve_precision(cfg.precision, self.device, planned_precision)
        self.amp_dtype = autocast_dtype(self.precision)
        planned_cl = (budget_notes.get("chosen") or {}).get("channels_last") if measured_here else None
        if cfg.channels_last is not None:
            self.channels_last = cfg.channels_last
        elif isinstance(planned_cl, bool):
            self.channels_last = planned_cl
        else:
            self.channels_last = self.device.type == "cpu"

        # -------- plan of the network actually trained (stored in every checkpoint)
        net = cfg_plan.network(self.arch)
        changes: dict[str, Any] = {}
        if not cfg.deep_supervision and net.deep_supervision:
            changes["deep_supervision"] = False
        if cfg.batch_size is not None and cfg.batch_size != net.batch_size:
            changes["batch_size"] = cfg.batch_size
        # mirrored axes: the run's own setting, else the plan's; stored in the run's plan, so that mirror
        # TTA at prediction flips exactly the axes the network was trained to see flipped
        mirror_axes = resolve_mirror_axes(cfg.augmentation, cfg_plan)
        if changes or mirror_axes != cfg_plan.mirror_axes:
            net = dataclasses.replace(net, **changes)
            networks = dict(cfg_plan.networks)
            networks[self.arch] = net
            extra = {}
            if self.arch == cfg_plan.default_arch and "batch_size" in changes:
                extra["batch_size"] = net.batch_size
            cfg_plan = dataclasses.replace(cfg_plan, networks=networks, mirror_axes=mirror_axes, **extra)
            configs = dict(plan.configurations)
            configs[self.configuration] = cfg_plan
            plan = dataclasses.replace(plan, configurations=configs)
        self.plan, self.net_plan = plan, net
        self.patch_size = tuple(net.patch_size)
        self.dims = len(self.patch_size)
        self.batch_size = net.batch_size
        self.batch_lo, self.batch_hi = dist_ctx.batch_slice(self.batch_size)
        self.local_batch = self.batch_hi - self.batch_lo
        spacing = cfg_plan.spacing
        self.anisotropic = self.dims == 3 and max(spacing) / max(min(spacing[1:]), 1e-8) >= cfg.augmentation.anisotropy_threshold \
            and spacing[0] == max(spacing)

        # -------- data
        all_ids = sorted(set(self.train_ids) | set(self.val_ids))
        loaded = {c.case_id: c for c in load_training_cases(work_dir, plan, self.configuration, all_ids,
                                                            progress=dist_ctx.is_main)}
        self.train_cases = [loaded[c] for c in self.train_ids]
        self.val_cases = [loaded[c] for c in self.val_ids]
        self.mirror_axes = cfg_plan.resolved_mirror_axes()
        augmentation = dataclasses.replace(cfg.augmentation, mirror_axes=self.mirror_axes)
        self.sampler = PatchSampler(self.train_cases, self.patch_size, self.batch_size, cfg.foreground_oversample,
                                    augmentation, seed=cfg.seed, anisotropic=self.anisotropic)
        pseudo_cases = self.val_cases or self.train_cases
        self.val_sampler = PatchSampler(pseudo_cases, self.patch_size, self.batch_size, cfg.foreground_oversample,
                                        None, seed=cfg.seed + 1, anisotropic=self.anisotropic)

        # -------- model, loss, optimizer
        from medseg.networks import build_network

        self.num_classes = plan.num_classes
        model = build_network(net, plan.num_channels, self.num_classes).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=channels_last_format(self.dims))
        self.model: nn.Module = model
        if dist_ctx.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.loss_fn = DeepSupervisionLoss(DiceCELoss(
            dice_weight=cfg.dice_weight, ce_weight=cfg.ce_weight, batch_dice=cfg.batch_dice, smooth=cfg.dice_smooth,
            class_weights=cfg.class_weights, label_smoothing=cfg.label_smoothing, focal_gamma=cfg.focal_gamma,
        )).to(self.device)
        if cfg.class_weights is not None and len(cfg.class_weights) != self.num_classes:
            raise ConfigError(f"class_weights has {len(cfg.class_weights)} values but the plan has {self.num_classes} classes")
        opt = cfg.resolved()
        self.lr0 = float(opt.lr)
        if opt.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                model.parameters(), lr=self.lr0, momentum=opt.momentum, nesterov=cfg.nesterov and opt.momentum > 0,
                weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr0, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

        # -------- progress state
        self.epoch = 0
        self.iteration = 0
        self.elapsed_before = 0.0
        self.best_metric: float | None = None
        self.ema_metric: float | None = None
        self.history: list[dict[str, Any]] = []
        self.iter_seconds: float | None = None  # smoothed duration of one training iteration
        self.fwd_seconds_per_sample: float | None = None  # eval forward time of one patch
        self.end_epoch_seconds: float | None = None  # checkpoint + log + plot time at the end of an epoch
        self.pseudo_dice_seconds: float | None = None
        self._progress_floor = 0.0  # time-budget progress reached in this session
        if checkpoint is not None:
            self._restore(checkpoint)

    # ------------------------------------------------------------------ state
    @property
    def time_budget_seconds(self) -> float | None:
        m = self.cfg.time_budget_minutes
        return None if m is None else 60.0 * m

    @property
    def max_epochs(self) -> int | None:
        if self.cfg.epochs is not None:
            return self.cfg.epochs
        return None if self.time_budget_seconds is not None else DEFAULT_EPOCHS

    def elapsed(self) -> float:
        """Seconds this run has spent, over all its sessions (each counted from its start)."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    def state_dict(self, finished: bool = False) -> dict[str, Any]:
        core = unwrap(self.model)
        return {
            "format": CHECKPOINT_FORMAT,
            "model": core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"name": self.cfg.lr_schedule, "lr0": self.lr0, "progress": self.progress()},
            "grad_scaler": None if self.scaler is None else self.scaler.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "elapsed_seconds": self.elapsed(),
            "rng": capture_rng_state(),
            "train_config": self.cfg.to_dict(),
            "plan": self.plan.to_dict(),
            "configuration": self.configuration,
            "arch": self.arch,
            "best_metric": self.best_metric,
            "ema_metric": self.ema_metric,
            "history": self.history,
            "finished": finished,
            "precision": self.precision,
            "timing": {"iter_seconds": self.iter_seconds, "fwd_seconds_per_sample": self.fwd_seconds_per_sample},
        }

    def _restore(self, ckpt: dict[str, Any]) -> None:
        where = self.run_dir / "checkpoint_latest.pt"
        try:
            unwrap(self.model).load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(f"{where}: weights do not fit the {self.arch} network of the plan ({first})") from None
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{where}: optimizer state does not fit ({exc}); was the optimizer changed?") from None
        if self.scaler is not None and ckpt.get("grad_scaler"):
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.epoch = int(ckpt["epoch"])
        self.iteration = int(ckpt["iteration"])
        self.elapsed_before = float(ckpt.get("elapsed_seconds", 0.0))
        self.best_metric = ckpt.get("best_metric")
        self.ema_metric = ckpt.get("ema_metric")
        self.history = list(ckpt.get("history", []))
        timing = ckpt.get("timing") or {}
        self.iter_seconds = timing.get("iter_seconds")
        self.fwd_seconds_per_sample = timing.get("fwd_seconds_per_sample")
        if "rng" in ckpt:
            restore_rng_state(ckpt["rng"])
        logger.info("resuming %s at epoch %d, iteration %d (%.1f min trained)", self.run_dir, self.epoch,
                    self.iteration, self.elapsed_before / 60)

    # ------------------------------------------------------------------ schedule and budget
    def final_validation_estimate(self) -> float:
        """Seconds the final sliding-window validation is expected to take (0 when there is none)."""
        if not (self.cfg.final_validation and self.val_cases):
            return 0.0
        per_sample = self.fwd_seconds_per_sample
        if per_sample is None:
            per_sample = (self.iter_seconds or 1.0) / max(1, self.local_batch) / 3.0
        mirrors, shifts = 1, [tuple(0 for _ in self.patch_size)]
        if self.cfg.validation_tta:
            axes, shifts = tta_variants(self.mirror_axes, self.net_plan.total_stride())
            mirrors = 2 ** len(axes)
        windows = 0
        voxels = 0
        for c in self.val_cases:
            shape = c.data.shape[1:]
            for offset in shifts:
                grown = shifted_shape(shape, offset)[-len(offset):]
                tiles = int(np.prod([num_tiles(s, p, 0.5) for s, p in zip(grown, self.patch_size)]))
                windows += tiles * (shape[0] if self.dims == 2 else 1)
            voxels += int(np.prod(shape))
        # network time (batch 1 in 3D is less efficient than the measured batches) + resampling/export
        return 1.5 * windows * mirrors * per_sample + len(self.val_cases) * 0.5 + voxels * self.num_classes * 5e-8

    def training_deadline(self) -> float | None:
        """Elapsed seconds at which training iterations must stop (time-budget runs), else None."""
        budget = self.time_budget_seconds
        if budget is None:
            return None
        reserve = self.final_validation_estimate()
        if reserve > 0.5 * budget:
            reserve = 0.5 * budget
        # the last epoch's bookkeeping and the final checkpoints come after the last iteration
        bookkeeping = 2.0 * (self.end_epoch_seconds if self.end_epoch_seconds is not None else 1.0)
        margin = min(30.0, 0.02 * budget)
        return max(budget - reserve - bookkeeping - margin, 0.0)

    def progress(self) -> float:
        """Training progress in [0, 1] driving the learning-rate schedule."""
        deadline = self.training_deadline()
        if deadline is not None:
            # the deadline moves a little as the time estimates improve; never let the schedule go back
            p = min(1.0, self.elapsed() / deadline) if deadline > 0 else 1.0
            self._progress_floor = max(self._progress_floor, p)
            return self._progress_floor
        total = (self.max_epochs or DEFAULT_EPOCHS) * self.cfg.iters_per_epoch
        return min(1.0, self.iteration / total)

    def training_done(self) -> bool:
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            return True
        deadline = self.training_deadline()
        if deadline is not None:
            return self.elapsed() + (self.iter_seconds or 0.0) >= deadline
        return False

    def _set_lr(self, progress: float) -> float:
        lr = self.lr0 * lr_factor(self.cfg.lr_schedule, progress, self.cfg.poly_power, self.cfg.cosine_cycles)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # ------------------------------------------------------------------ steps
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        x = x.to(self.device, non_blocking=non_blocking)
        if self.channels_last:
            x = x.contiguous(memory_format=channels_last_format(self.dims))
        return x, y.to(self.device, non_blocking=non_blocking).long()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on a batch; returns the loss (mean over this rank's samples)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            outputs = self.model(x)
        loss = self.loss_fn(outputs, y)
        # DDP averages gradients over ranks; weight by the rank's share so uneven splits stay exact
        scale = self.local_batch * self.dist.world_size / self.batch_size
        scaled = loss * scale if scale != 1 else loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            scaled.backward()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return float(loss.detach())

    def _sync_stop_and_progress(self) -> tuple[bool, float]:
        """Rank 0's decision whether to stop and its progress, on every rank."""
        stop = self.training_done()
        progress = self.progress()
        if self.dist.enabled and self.time_budget_seconds is not None:
            t = torch.tensor([1.0 if stop else 0.0, progress], dtype=torch.float64)
            self.dist.broadcast(t)
            stop, progress = bool(t[0] > 0.5), float(t[1])
        return stop, progress

    def train_epoch(self, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        """Up to ``iters_per_epoch`` iterations (fewer when the time budget ends)."""
        self.model.train()
        n = 0
        loss_sum = 0.0
        wait = 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        t_start = time.perf_counter()
        bar = tqdm(total=self.cfg.iters_per_epoch, desc=f"epoch {self.epoch}", unit="it", leave=False,
                   disable=not self.dist.is_main, dynamic_ncols=True)
        try:
            for _ in range(self.cfg.iters_per_epoch):
                stop, progress = self._sync_stop_and_progress()
                if stop and self.time_budget_seconds is not None:
                    break
                lr = self._set_lr(progress)
                t0 = time.perf_counter()
                x, y = next(stream)
                t1 = time.perf_counter()
                wait += t1 - t0
                x, y = self._to_device(x, y)
                self.thread_tuner.before_step()
                t_step = time.perf_counter()
                loss = self.train_step(x, y)
                self.thread_tuner.after_step(time.perf_counter() - t_step)
                if not math.isfinite(loss):
                    logger.warning("iteration %d: non-finite loss %s", self.iteration, loss)
                loss_sum += loss
                n += 1
                self.iteration += 1
                dt = time.perf_counter() - t0
                self.iter_seconds = dt if self.iter_seconds is None else 0.9 * self.iter_seconds + 0.1 * dt
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        finally:
            bar.close()
        seconds = time.perf_counter() - t_start
        stats = torch.tensor([loss_sum * self.local_batch, float(n * self.local_batch)], dtype=torch.float64)
        self.dist.all_reduce_sum(stats)
        mean_loss = float(stats[0] / stats[1]) if stats[1] > 0 else float("nan")
        return {"iterations": n, "train_loss": mean_loss, "lr": lr, "epoch_seconds": seconds,
                "data_wait_seconds": wait, "it_per_s": n / seconds if seconds > 0 else 0.0}

    @torch.no_grad()
    def pseudo_dice(self) -> dict[str, Any]:
        """Dice of the argmax on ``val_iters`` batches of held-out patches (no augmentation).

        TP/FP/FN are summed over all batches (and ranks) per class before the Dice is taken.
        """
        if self.cfg.val_iters == 0:
            return {}
        core = unwrap(self.model)
        core.eval()
        counts = torch.zeros((3, self.num_classes), dtype=torch.int64)
        t = time.perf_counter()
        samples = 0
        try:
            for j in range(self.cfg.val_iters):
                with single_threaded():
                    x, y = self.val_sampler.batch(self.epoch * self.cfg.val_iters + j, self.batch_lo, self.batch_hi)
                x, y = self._to_device(x, y)
                with self._autocast():
                    out = core(x)
                if isinstance(out, (list, tuple)):
                    out = out[0]
                counts += hard_dice_counts(out.float(), y)
                samples += x.shape[0]
        finally:
            core.train()
        if samples:
            per = (time.perf_counter() - t) / samples
            self.fwd_seconds_per_sample = per if self.fwd_seconds_per_sample is None else 0.5 * (self.fwd_seconds_per_sample + per)
        self.dist.all_reduce_sum(counts)
        tp, fp, fn = counts.double()
        denom = 2 * tp + fp + fn
        dice = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(denom, float("nan")))[1:]
        valid = dice[~torch.isnan(dice)]
        mean = float(valid.mean()) if valid.numel() else float("nan")
        return {"val_dice": mean, "dice_per_class": [None if math.isnan(v) else float(v) for v in dice.tolist()]}

    # ------------------------------------------------------------------ outputs
    def _write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.run_dir / name, json.dumps(obj, indent=1, default=float) + "\n")

    def write_progress(self, status: str) -> None:
        if not self.dist.is_main:
            return
        deadline = self.training_deadline()
        self._write_json("progress.json", {
            "status": status,
            "configuration": self.configuration,
            "arch": self.arch,
            "fold": self.cfg.fold,
            "epoch": self.epoch,
            "max_epochs": self.max_epochs,
            "iteration": self.iteration,
            "elapsed_seconds": round(self.elapsed(), 2),
            "time_budget_seconds": self.time_budget_seconds,
            "training_deadline_seconds": None if deadline is None else round(deadline, 2),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "num_threads": self.num_threads,
            "threads_in_use": self.thread_tuner.current,
            "num_workers": self.num_workers,
            "world_size": self.dist.world_size,
            "best_ema_pseudo_dice": self.best_metric,
            "history": self.history,
        })
        try:
            self.plot_curves()
        except Exception as exc:  # a plotting problem must never stop training
            logger.warning("could not draw training_curves.png: %s", exc)

    def plot_curves(self) -> None:
        """``training_curves.png``: training loss, pseudo Dice (raw and EMA) and learning rate per epoch."""
        if not self.history:
            return
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ep = [h["epoch"] for h in self.history]
        fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
        axes[0].plot(ep, [h["train_loss"] for h in self.history], label="train loss")
        axes[0].set_ylabel("loss")
        axes[0].legend()
        axes[1].plot(ep, [h.get("val_dice", float("nan")) for h in self.history], label="pseudo Dice", alpha=0.6)
        axes[1].plot(ep, [h.get("ema_dice", float("nan")) for h in self.history], label="pseudo Dice (EMA)")
        axes[1].set_ylabel("Dice")
        axes[1].legend()
        axes[2].plot(ep, [h["lr"] for h in self.history], label="learning rate")
        axes[2].set_ylabel("lr")
        axes[2].set_xlabel("epoch")
        fig.suptitle(f"{self.configuration}/{self.arch} {self.cfg.fold_name}")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        atomic_write_bytes(self.run_dir / "training_curves.png", buf.getvalue())

    def save(self, name: str, finished: bool = False) -> None:
        if self.dist.is_main:
            save_checkpoint(self.state_dict(finished=finished), self.run_dir / f"checkpoint_{name}.pt")

    # ------------------------------------------------------------------ main loop
    def fit(self) -> bool:
        """Train until the epochs or the time budget are used up; write checkpoints and logs.

        Returns:
            Whether any iteration was trained (False for a run that was already complete).
        """
        if self.dist.is_main:
            remove_stale_temporaries(self.run_dir)
        logger.info(
            "training %s/%s %s: %d train / %d held-out cases, patch %s, batch %d%s, %s, channels_last=%s, "
            "%d thread(s), %d data worker(s), %s, augmentation %s",
            self.configuration, self.arch, self.cfg.fold_name, len(self.train_cases), len(self.val_cases),
            list(self.patch_size), self.batch_size,
            f" ({self.local_batch} per rank x {self.dist.world_size})" if self.dist.enabled else "",
            self.precision, self.channels_last, self.num_threads, self.num_workers,
            f"time budget {self.cfg.time_budget_minutes:g} min" if self.time_budget_seconds is not None
            else f"{self.max_epochs} epochs x {self.cfg.iters_per_epoch} iterations",
            _augmentation_summary(self.cfg.augmentation),
        )
        if self.training_done():
            logger.info("training of %s is already complete (epoch %d); pass a larger --epochs or "
                        "--time-budget to extend it", self.run_dir, self.epoch)
            return False
        stream = batch_iterator(self.sampler, self.iteration, self.batch_lo, self.batch_hi, self.num_workers)
        try:
            while not self.training_done():
                stats = self.train_epoch(stream)
                if stats["iterations"] == 0:
                    break
                deadline = self.training_deadline()
                skip_val = deadline is not None and (
                    self.training_done() or self.elapsed() + (self.pseudo_dice_seconds or 0.0) > deadline)
                t = time.perf_counter()
                val = {} if skip_val else self.pseudo_dice()
                if val:
                    self.pseudo_dice_seconds = time.perf_counter() - t
                self.epoch += 1
                t = time.perf_counter()
                self._end_epoch(stats, val)
                self.end_epoch_seconds = time.perf_counter() - t
        finally:
            close = getattr(stream, "_shutdown_workers", None)
            if close is not None:
                close()
        self.write_progress("trained")
        return True

    def _end_epoch(self, stats: dict[str, Any], val: dict[str, Any]) -> None:
        entry: dict[str, Any] = {"epoch": self.epoch, "iteration": self.iteration, **stats}
        improved = False
        if val and not math.isnan(val["val_dice"]):
            d = val["val_dice"]
            a = self.cfg.ema_alpha
            self.ema_metric = d if self.ema_metric is None else a * self.ema_metric + (1 - a) * d
            entry.update(val)
            entry["ema_dice"] = self.ema_metric
            if self.best_metric is None or self.ema_metric > self.best_metric:
                self.best_metric = self.ema_metric
                improved = True
        entry["elapsed_seconds"] = self.elapsed()
        self.history.append(entry)
        per_class = ""
        if val.get("dice_per_class"):
            per_class = " [" + ", ".join("-" if v is None else f"{v:.3f}" for v in val["dice_per_class"]) + "]"
        logger.info(
            "epoch %d: loss %.4f, pseudo Dice %s (EMA %s)%s, lr %.2e, %.1f it/s, %.0f s (data wait %.1f s), "
            "elapsed %.1f min",
            self.epoch, stats["train_loss"], f"{val['val_dice']:.4f}" if val else "-",
            f"{self.ema_metric:.4f}" if self.ema_metric is not None else "-", per_class, stats["lr"],
            stats["it_per_s"], stats["epoch_seconds"], stats["data_wait_seconds"], self.elapsed() / 60,
        )
        if improved:
            self.save("best")
            logger.info("new best EMA pseudo Dice %.4f -> checkpoint_best.pt", self.best_metric)
        self.save("latest")
        self.write_progress("training")


def _augmentation_summary(aug: AugmentationConfig) -> str:
    """``off``, ``spatial + mirroring`` or ``spatial + mirroring + intensity`` (for the start-of-run log)."""
    if not aug.enabled:
        return "off"
    return "spatial + mirroring" + ("" if aug.intensity is False else " + intensity")
