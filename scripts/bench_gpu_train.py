"""The training-step parts of the GPU check (``scripts/bench_gpu.py``): the memory model and throughput.

**Plans.** Every plan is made as ``medseg plan --gpu-memory-gb G --device cuda`` makes it
(:func:`medseg.planning.planner.plan_dataset` with the same :class:`PlannerOptions`), from a fingerprint:

* ``hippocampus``: the fingerprint of the carried hippocampus cases, its cases repeated up to the 260 of
  MSD Task04 (the 5%-of-the-dataset batch cap then binds as it does on the whole set);
* ``tumour128``: 4 MRI channels (T1, T1ce, T2, FLAIR), 5 classes, 128^3 voxels at 1 mm;
* ``brain45``: 1 MRI channel, 46 classes (45 structures), 160x192x224 at 1 mm (voxelmorph-like).

The synthetic sets have 1000 cases, so the batch is bound by memory, not by the 5% cap. ``--dry-run``
uses tiny shapes and a handful of cases. Plans are written to ``SCRATCH/plans/<set>.json`` for the
prediction part.

**Memory** (one row per plan): 20 real training steps of the trainer (:class:`OptimizerStep`: loss,
gradient scaling for fp16, clipping, SGD) at the precision and memory format the run would train with
(:func:`planned_precision_and_layout`), ``cudnn.benchmark`` on, against the plan's estimate. CUDA:
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over all steps (cuDNN's autotuning included)
and over steps 3-20; target 0.85-1.10x of the estimate and reserved below ``--gpu-memory-gb``. CPU
(``--dry-run``): :func:`medseg.planning.memory.measure_training_peak_gb`, the reference step's real peak.

**Throughput**: the tumour128 3d_fullres network at batch ``--throughput-batch`` (default 2), fp32 / fp16 /
bf16 autocast x channels-last-3d off / on, ``cudnn.benchmark`` on: iterations per second and the achieved
TFLOP/s (``torch.utils.flop_counter.FlopCounterMode`` over one step) against the card's peak.

Sizes in GiB (2**30 bytes), times in seconds.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from medseg.distributed import DistContext
from medseg.fingerprint import CaseFingerprint, Fingerprint, extract_fingerprint
from medseg.io.dataset import DatasetInfo, load_dataset
from medseg.machine import autocast_dtype
from medseg.planning.memory import estimate_training_memory_gb, measure_training_peak_gb
from medseg.planning.plan import Plan
from medseg.planning.planner import PlannerOptions, plan_dataset
from medseg.planning.stage import Stage
from medseg.training.config import TrainConfig
from medseg.training.device import planned_precision_and_layout, to_device
from medseg.training.step import OptimizerStep, build_loss, build_model, build_optimizer

GIB = float(2**30)
MEMORY_TARGET = (0.85, 1.10)  # measured peak / estimate
MSD_HIPPOCAMPUS_CASES = 260
#: dense tensor-core peak TFLOP/s (spec sheets; fp32 convolutions run as TF32 while cudnn.allow_tf32 is on)
PEAK_TFLOPS = {
    "H100 PCIe": {"fp16": 756.0, "bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


@dataclass(frozen=True)
class SetSpec:
    """A synthetic dataset, described by its fingerprint only (no image is written)."""

    name: str
    channels: tuple[str, ...]
    num_labels: int  # background included
    shape: tuple[int, int, int]  # (Z, Y, X) voxels
    spacing: tuple[float, float, float]  # mm
    cases: int


SYNTHETIC = {
    False: (
        SetSpec("tumour128", ("T1", "T1ce", "T2", "FLAIR"), 5, (128, 128, 128), (1.0, 1.0, 1.0), 1000),
        SetSpec("brain45", ("T1",), 46, (160, 192, 224), (1.0, 1.0, 1.0), 1000),
    ),
    True: (
        SetSpec("tumour128", ("T1", "T1ce", "T2", "FLAIR"), 5, (16, 16, 16), (1.0, 1.0, 1.0), 20),
        SetSpec("brain45", ("T1",), 46, (16, 16, 20), (1.0, 1.0, 1.0), 20),
    ),
}
#: (set, configuration) of the memory rows
MEMORY_ROWS = (
    ("hippocampus", "3d_fullres"),
    ("hippocampus", "2d"),
    ("tumour128", "3d_fullres"),
    ("brain45", "3d_fullres"),
)
SETTINGS = tuple((p, cl) for p in ("fp32", "fp16", "bf16") for cl in (False, True))


def synthetic_dataset(spec: SetSpec) -> tuple[DatasetInfo, Fingerprint]:
    """The dataset description and fingerprint of ``spec`` (every class in every case)."""
    labels = tuple(range(spec.num_labels))
    per_class = max(1, int(np.prod(spec.shape)) // (20 * spec.num_labels))
    counts = {k: per_class for k in labels[1:]}
    comps = {k: (per_class,) for k in labels[1:]}
    cases = tuple(
        CaseFingerprint(f"{spec.name}_{i:04d}", spec.spacing, spec.shape, spec.shape, 1.0, counts, comps)
        for i in range(spec.cases)
    )
    ds = DatasetInfo(
        root=Path(spec.name),
        name=spec.name,
        channel_names=spec.channels,
        label_ids=labels,
        label_names=("background",) + tuple(f"class_{k}" for k in labels[1:]),
        cases=(),
        file_ending=".nii.gz",
    )
    return ds, Fingerprint(spec.name, spec.channels, labels, cases, ())


def hippocampus_dataset(data: Path, dry_run: bool, workers: int) -> tuple[DatasetInfo, Fingerprint]:
    """The carried hippocampus cases' fingerprint (6 cases in a dry run), repeated up to 260 cases otherwise."""
    ds = load_dataset(data)
    if dry_run:
        ds = dataclasses.replace(ds, cases=ds.cases[:6])
    fp = extract_fingerprint(ds, num_workers=workers, progress=False)
    if not dry_run and fp.num_cases < MSD_HIPPOCAMPUS_CASES:
        repeated = [
            dataclasses.replace(c, case_id=f"{c.case_id}_r{i // fp.num_cases}")
            for i, c in enumerate(fp.cases * math.ceil(MSD_HIPPOCAMPUS_CASES / fp.num_cases))
        ]
        fp = dataclasses.replace(fp, cases=tuple(repeated[:MSD_HIPPOCAMPUS_CASES]))
    return ds, fp


def make_plans(data: Path, scratch: Path, gpu_memory_gb: float, device: str, dry_run: bool) -> dict[str, Plan]:
    """Plan every set (or load the plans an earlier part wrote into ``scratch/plans``)."""
    out: dict[str, Plan] = {}
    folder = scratch / "plans"
    folder.mkdir(parents=True, exist_ok=True)
    options = PlannerOptions(gpu_memory_gb=gpu_memory_gb, device=device)
    if dry_run:  # narrow networks: a dry run only shows that every path runs
        options = dataclasses.replace(options, base_features=4, max_features=16)
    sets: dict[str, Any] = {s.name: s for s in SYNTHETIC[dry_run]}
    for name in ("hippocampus", *sets):
        path = folder / f"{name}.json"
        if path.is_file():
            out[name] = Plan.load(path)
            continue
        if name == "hippocampus":
            ds, fp = hippocampus_dataset(data, dry_run, workers=max(1, min(8, os.cpu_count() or 1)))
        else:
            ds, fp = synthetic_dataset(sets[name])
        out[name] = plan_dataset(ds, fp, options)
        out[name].save(path)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(
    stage: Stage,
    device: torch.device,
    precision: str,
    channels_last: bool,
    batch: int,
    steps: int,
    deadline: float,
    reset_after: int = 2,
) -> dict[str, Any]:
    """Run up to ``steps`` real training steps of ``stage``'s network (random batch) and time them.

    Returns:
        ``steps_done``, ``step_s`` (median of the steps after ``reset_after``, else of all), ``status``, and on
        CUDA ``alloc_gb`` / ``reserved_gb`` (peaks over every step, model built included) and
        ``steady_alloc_gb`` / ``steady_reserved_gb`` (over the steps after ``reset_after``).
    """
    cfg = TrainConfig(configuration=stage.config_name, arch=stage.arch, device=device.type, precision=precision)
    cuda = device.type == "cuda"
    free_memory(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    dist = DistContext()
    model, _ = build_model(stage, device, channels_last, dist)
    loss_fn = build_loss(cfg, stage.plan).to(device)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and cuda else None
    step = OptimizerStep(
        model, loss_fn, optimizer, scaler, device, autocast_dtype(precision), dist, batch, batch, cfg.grad_clip,
        precision, Path(os.devnull),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, stage.in_channels, *stage.patch_size), generator=gen)
    y = torch.randint(0, stage.num_classes, (batch, *stage.patch_size), generator=gen)
    x, y = to_device(x, y, device, channels_last)
    times: list[float] = []
    out: dict[str, Any] = {"status": "ok"}
    first = (0.0, 0.0)
    for i in range(steps):
        if time.perf_counter() > deadline:
            out["status"] = f"time box: {i} of {steps} steps"
            break
        t0 = time.perf_counter()
        step(x, y, i)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if cuda and i == reset_after - 1:
            first = (torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB)
            torch.cuda.reset_peak_memory_stats(device)
    out["steps_done"] = len(times)
    steady = times[reset_after:] or times
    out["step_s"] = statistics.median(steady) if steady else float("nan")
    if cuda:
        now = (torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB)
        reset = len(times) >= reset_after  # the peaks were reset after step ``reset_after``
        out["alloc_gb"], out["reserved_gb"] = (max(first[0], now[0]), max(first[1], now[1])) if reset else now
        out["steady_alloc_gb"], out["steady_reserved_gb"] = now if len(times) > reset_after else (math.nan, math.nan)
    del model, optimizer, step, x, y
    return out


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory (torch's OutOfMemoryError, or its RuntimeError text)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def error_status(exc: BaseException) -> str:
    """``crashed: OOM`` for out-of-memory, else ``crashed: <type>: <first line>``."""
    if is_oom(exc):
        return "crashed: OOM"
    first = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"crashed: {type(exc).__name__}: {first}"


def memory_verdict(measured: float, estimate: float | None, reserved: float | None, target_gb: float) -> str:
    """``ok`` or what is off: the measured/estimate ratio outside :data:`MEMORY_TARGET`, or reserved above the
    planner's memory target."""
    problems = []
    if estimate and math.isfinite(measured):
        ratio = measured / estimate
        if not MEMORY_TARGET[0] <= ratio <= MEMORY_TARGET[1]:
            problems.append(f"ratio {ratio:.2f} outside {MEMORY_TARGET[0]}-{MEMORY_TARGET[1]}")
    if reserved is not None and math.isfinite(reserved) and reserved > target_gb:
        problems.append(f"reserved {reserved:.2f} > target {target_gb:g} GiB")
    return "ok" if not problems else "OFF: " + "; ".join(problems)


def memory_part(plans: dict[str, Plan], device: torch.device, target_gb: float, steps: int, deadline: float) -> list:
    """One row per :data:`MEMORY_ROWS` entry (see the module docstring)."""
    rows = []
    torch.backends.cudnn.benchmark = True  # as the trainer on CUDA
    for k, (name, config) in enumerate(MEMORY_ROWS):
        row: dict[str, Any] = {"part": "memory", "row": f"{name} {config}"}
        rows.append(row)
        try:
            stage = Stage.resolve(plans[name], config, "unet")
            net = stage.network
            cfg = TrainConfig(configuration=config, arch="unet", device=device.type)
            precision, cl = planned_precision_and_layout(cfg, stage, device)
            est_run = estimate_training_memory_gb(
                dataclasses.replace(net, precision=precision), stage.in_channels, stage.num_classes, device=device.type
            )
            row["setting"] = f"patch {'x'.join(map(str, net.patch_size))} batch {net.batch_size} {precision}" + (
                " channels-last" if cl else ""
            )
            row["values"] = {
                "estimate_gb": net.estimated_memory_gb,
                "estimate_at_run_precision_gb": est_run,
                "plan_precision": net.precision,
                "precision": precision,
                "channels_last": cl,
                "target_gb": target_gb,
            }
            left = (deadline - time.perf_counter()) / (len(MEMORY_ROWS) - k)
            res = train_steps(stage, device, precision, cl, net.batch_size, steps, time.perf_counter() + left)
            row["values"].update(res)
            if device.type == "cuda":
                measured, reserved = res["alloc_gb"], res["reserved_gb"]
            else:
                measured = measure_training_peak_gb(
                    dataclasses.replace(net, precision=precision), stage.in_channels, stage.num_classes, device, cl
                )
                reserved = None
                row["values"]["alloc_gb"] = measured
            est = net.estimated_memory_gb
            ratio = measured / est if est else float("nan")
            row["values"]["ratio"] = ratio
            row["measured"] = f"{'alloc' if device.type == 'cuda' else 'peak'} {measured:.3f}" + (
                f", reserved {reserved:.3f}" if reserved is not None else ""
            )
            row["measured"] += f" GiB ({res['steps_done']} steps, {res['step_s']:.3f} s/step)"
            row["reference"] = f"plan {est:.3f} GiB ({net.precision}); {precision} {device.type} rules {est_run:.3f}"
            row["values"]["ratio_at_run_precision"] = measured / est_run
            row["check"] = (
                f"{ratio:.2f}x of plan [{MEMORY_TARGET[0]}-{MEMORY_TARGET[1]}]; {measured / est_run:.2f}x of the "
                f"{precision} {device.type} estimate"
            )
            row["status"] = memory_verdict(measured, est, reserved, target_gb)
            if res["status"] != "ok":  # fewer steps than asked: the peaks are those of the steps done
                row["status"] += f" ({res['status']})"
        except Exception as exc:  # noqa: BLE001 - a row that fails records why; the others go on
            row["status"] = error_status(exc)
            if device.type == "cuda":
                row.setdefault("values", {})["reserved_gb_at_failure"] = torch.cuda.max_memory_reserved(device) / GIB
        free_memory(device)  # after the except clause: a failed step's tensors die with its traceback
    return rows


def free_memory(device: torch.device) -> None:
    """Collect garbage (tensors in reference cycles) and hand cached CUDA blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_flops(stage: Stage, device: torch.device, batch: int) -> int:
    """Floating-point operations of one training step (forward, loss, backward) at ``batch``."""
    model = stage.network.build(stage.in_channels, stage.num_classes).to(device)
    cfg = TrainConfig(configuration=stage.config_name, arch=stage.arch, device=device.type)
    loss_fn = build_loss(cfg, stage.plan).to(device)
    x = torch.randn((batch, stage.in_channels, *stage.patch_size), device=device)
    y = torch.randint(0, stage.num_classes, (batch, *stage.patch_size), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model(x), y).backward()
    return int(counter.get_total_flops())


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The card's dense peak for ``precision`` (fp32 counts as TF32 while cuDNN may use it); None: unknown card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "tf32" if precision == "fp32" and torch.backends.cudnn.allow_tf32 else precision
    for card, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if all(word in name for word in card.split()):
            return peaks[key]
    return None


def throughput_part(plans: dict[str, Plan], device: torch.device, batch: int, steps: int, deadline: float) -> list:
    """One row per :data:`SETTINGS` entry, then one row on whether the run's own setting is the fastest."""
    torch.backends.cudnn.benchmark = True
    stage = Stage.resolve(plans["tumour128"], "3d_fullres", "unet")
    batch = min(batch, stage.batch_size)
    cfg = TrainConfig(configuration="3d_fullres", arch="unet", device=device.type)
    chosen = planned_precision_and_layout(cfg, stage, device)
    flops = step_flops(stage, device, batch)
    rows: list[dict[str, Any]] = []
    speeds: dict[tuple[str, bool], float] = {}
    for k, (precision, cl) in enumerate(SETTINGS):
        label = f"{precision}{' channels-last' if cl else ''}"
        row: dict[str, Any] = {"part": "throughput", "row": f"tumour128 3d_fullres {label}"}
        row["setting"] = f"patch {'x'.join(map(str, stage.patch_size))} batch {batch}, cudnn.benchmark"
        rows.append(row)
        if precision == "fp16" and device.type != "cuda":
            row["status"] = "skipped: fp16 autocast needs CUDA"
            continue
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            row["status"] = "skipped: no bf16 on this GPU"
            continue
        try:
            left = (deadline - time.perf_counter()) / (len(SETTINGS) - k)
            res = train_steps(stage, device, precision, cl, batch, steps, time.perf_counter() + left, reset_after=2)
            its = 1.0 / res["step_s"]
            tflops = flops * its / 1e12
            peak = peak_tflops(device, precision)
            speeds[(precision, cl)] = its
            row["values"] = {**res, "it_per_s": its, "tflops": tflops, "peak_tflops": peak, "flops_per_step": flops}
            row["measured"] = f"{its:.3g} it/s, {tflops:.3g} TFLOP/s"
            row["reference"] = f"peak {peak:g} TFLOP/s" if peak else "peak unknown (CPU or unlisted card)"
            row["check"] = f"{100 * tflops / peak:.1f}% of peak" if peak else ""
            row["status"] = res["status"]
        except Exception as exc:  # noqa: BLE001
            row["status"] = error_status(exc)
        free_memory(device)
    label = f"{chosen[0]}{' channels-last' if chosen[1] else ''}"
    row = {"part": "throughput", "row": f"run's choice: {label}", "setting": "planned_precision_and_layout"}
    if speeds:
        fastest = max(speeds, key=lambda s: speeds[s])
        mine = speeds.get(chosen)
        row["values"] = {"chosen": list(chosen), "fastest": list(fastest), "it_per_s": mine}
        row["measured"] = f"{mine:.2f} it/s" if mine else "not measured"
        row["reference"] = f"fastest {fastest[0]}{' channels-last' if fastest[1] else ''} {speeds[fastest]:.2f} it/s"
        ratio = (mine or 0.0) / speeds[fastest]
        row["check"] = f"{ratio:.2f}x of the fastest (>= 0.95)"
        row["status"] = "ok" if ratio >= 0.95 else "OFF: the run's setting is not the fastest"
    else:
        row["status"] = "no setting measured"
    rows.append(row)
    return rows
