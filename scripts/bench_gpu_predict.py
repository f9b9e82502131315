"""The prediction and real-run parts of the GPU check (``scripts/bench_gpu.py``).

**Prediction**: randomly initialised networks of the check's plans (``bench_gpu_train.make_plans``) predict
preprocessed volumes through :class:`medseg.inference.predictor.Predictor` (its own precision, window batch
and accumulator choices) with TTA (8 flips: the synthetic plans mirror every axis):

* a 155x240x240 4-channel case (BraTS-sized) with the tumour128 network;
* a 512x512x300 one-channel case (CT-sized) with the brain45 network (46 classes);
* a case whose ``(K, Z, Y, X)`` accumulator does not fit the GPU: a ballast allocation leaves
  ``--fallback-free-gb`` (2 GiB) of the card free, then a 46-class volume whose float16 accumulator needs
  1.3x that is predicted (a narrow network, no TTA). medseg must fall back (CPU accumulation or smaller
  tiles) with a warning; ``crashed: OOM`` otherwise. On the CPU (``--dry-run``) there is nothing to fall
  back from and the row only shows the path runs.

Each case is time-boxed (``should_stop``); seconds, ``torch.cuda.max_memory_allocated`` / ``reserved``.

**Real run**: the carried hippocampus cases less ``--held-out`` (the last ids) are planned with
``medseg plan --gpu-memory-gb G --device cuda``, trained with ``medseg train --fold all --time-budget M
--device cuda --no-validation``, the held-out cases predicted (TTA on) and scored with ``medseg evaluate``:
Dice per class against nnU-Net's 5-fold cross-validation on the whole set (0.8975 / 0.8807). Every command
runs in this process through :func:`medseg.cli.main.main`, as on the command line. ``--dry-run``: 8 cases,
2 held out, one epoch of 2 iterations of an 8-feature network on the CPU.

Sizes in GiB, times in seconds.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from medseg.cli.main import main as medseg_main
from medseg.inference.members import EnsembleMember
from medseg.inference.network_runner import auto_precision, inference_batch_size
from medseg.inference.predictor import Predictor
from medseg.inference.sliding_window import PredictionStopped, tta_variants
from medseg.inference.tiling import tile_starts
from medseg.io.dataset import load_dataset
from medseg.io.workdir import WorkDir
from medseg.planning.plan import Plan
from medseg.planning.stage import Stage

GIB = float(2**30)
NNUNET_HIPPOCAMPUS_CV = {1: 0.8975, 2: 0.8807}  # 3d_fullres, 5-fold CV, full schedule (../shared/data/README.md)
FALLBACK_OVERSIZE = 1.3  # the fallback case's accumulator needs this many times the free memory


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def fallback_status(exc: BaseException | None, warned: list[str], on_gpu: bool) -> str:
    """What the too-big case did: fell back with a warning, crashed (OOM or another error), or neither."""
    note = f": {warned[0][:160]}" if warned else ""
    if not on_gpu:
        return "n/a on the CPU (no GPU accumulator)" + (f"; warned{note}" if warned else "")
    if exc is None:
        return f"fell back{note}" if warned else "OFF: finished without a warning (did the accumulator fit?)"
    if isinstance(exc, PredictionStopped):
        return f"fell back, stopped at its time box{note}" if warned else "OFF: stopped at its time box, no warning"
    if _is_oom(exc):
        return "crashed: OOM"
    first = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"crashed: {type(exc).__name__}: {first}"


class _Warnings(logging.Handler):
    """Collects the messages of every warning logged while it is attached to the root logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _predict_case(
    stage: Stage, shape: tuple[int, ...], device: torch.device, use_tta: bool, box_s: float, ballast_free_gb: float = 0
) -> dict[str, Any]:
    """Predict one random preprocessed volume ``shape = (C, Z, Y, X)`` with a random network of ``stage``."""
    out: dict[str, Any] = {}
    cuda = device.type == "cuda"
    ballast = None
    model = stage.network.build(stage.in_channels, stage.num_classes)
    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    predictor = Predictor([EnsembleMember.of_stage(model, stage)], device=device, use_tta=use_tta)
    data = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    gc.collect()  # what an earlier case left in reference cycles
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        if ballast_free_gb:
            free, _ = torch.cuda.mem_get_info(device)
            extra = free - int(ballast_free_gb * GIB)
            try:
                ballast = torch.empty(max(extra, 0), dtype=torch.uint8, device=device)
            except Exception as e:  # noqa: BLE001 - the check's own set-up, not medseg, failed
                raise RuntimeError(f"a ballast of {extra / GIB:.1f} GiB could not be allocated: {e}") from None
            out["free_gb_after_ballast"] = torch.cuda.mem_get_info(device)[0] / GIB
        torch.cuda.reset_peak_memory_stats(device)
    handler = _Warnings()
    logging.getLogger().addHandler(handler)
    deadline = time.perf_counter() + box_s
    t0 = time.perf_counter()
    exc: BaseException | None = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            probs = predictor.predict_preprocessed(
                data, stage.config_name, should_stop=lambda: time.perf_counter() > deadline
            )
            out["output"] = f"{tuple(probs.shape)} {probs.dtype}"
            del probs
    except Exception as e:  # noqa: BLE001 - recorded by the caller
        exc = e.with_traceback(None)  # its frames (and their tensors) go now
    finally:
        logging.getLogger().removeHandler(handler)
    out["seconds"] = time.perf_counter() - t0
    out["warnings"] = handler.messages + [str(w.message) for w in caught]
    if cuda:
        out["alloc_gb"] = torch.cuda.max_memory_allocated(device) / GIB
        out["reserved_gb"] = torch.cuda.max_memory_reserved(device) / GIB
    axes, shifts = tta_variants(stage.mirror_axes, stage.total_stride) if use_tta else ((), [()])
    out["passes"] = 2 ** len(axes) * max(1, len(shifts))
    windows = math.prod(len(tile_starts(max(s, t), t, 0.5)) for s, t in zip(shape[1:], stage.patch_size))
    batch = inference_batch_size(stage.patch_size, stage.network.spec.base_features, stage.num_classes, device)
    out["forwards"], out["forwards_total"] = forwards[0], math.ceil(windows * out["passes"] / batch)
    del ballast, predictor, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {**out, "exception": exc}


def prediction_part(
    plans: dict[str, Plan], device: torch.device, dry_run: bool, free_gb: float, deadline: float
) -> list:
    """The three prediction rows (see the module docstring)."""
    tumour = Stage.resolve(plans["tumour128"], "3d_fullres", "unet")
    brain = Stage.resolve(plans["brain45"], "3d_fullres", "unet")
    k = brain.num_classes
    narrow_net = dataclasses.replace(
        brain.network, spec=dataclasses.replace(brain.network.spec, base_features=8, max_features=64)
    )
    narrow_cfg = dataclasses.replace(brain.configuration, networks={**brain.configuration.networks, "unet": narrow_net})
    narrow = brain.with_plan(
        dataclasses.replace(brain.plan, configurations={**brain.plan.configurations, "3d_fullres": narrow_cfg})
    )
    side = math.ceil((FALLBACK_OVERSIZE * free_gb * GIB / (2 * k)) ** (1 / 3))
    cases = [
        ("155x240x240 4-ch, TTA", tumour, (4, 20, 24, 24) if dry_run else (4, 155, 240, 240), True, 0.0),
        ("512x512x300 1-ch, 46 classes, TTA", brain, (1, 16, 24, 24) if dry_run else (1, 300, 512, 512), True, 0.0),
        (f"too big for the GPU: {side}^3, 46 classes", narrow, (1, 16, 20, 20) if dry_run else (1, side, side, side), False, free_gb),
    ]  # fmt: skip
    rows = []
    for i, (name, stage, shape, tta, ballast) in enumerate(cases):
        row: dict[str, Any] = {"part": "prediction", "row": name}
        row["setting"] = (
            f"patch {'x'.join(map(str, stage.patch_size))}, {stage.network.spec.base_features} features, "
            f"{auto_precision(stage.precision, device)} (the plan's)"
        )
        rows.append(row)
        left = (deadline - time.perf_counter()) / (len(cases) - i)
        try:
            res = _predict_case(stage, shape, device, tta, left, ballast if device.type == "cuda" else 0)
        except Exception as exc:  # noqa: BLE001 - setting the case up failed (prediction errors come in ``res``)
            row["status"] = f"set-up failed: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        exc = res.pop("exception")
        row["values"] = res
        mem = f", peak alloc {res['alloc_gb']:.2f} / reserved {res['reserved_gb']:.2f} GiB" if "alloc_gb" in res else ""
        row["measured"] = f"{res['seconds']:.1f} s{mem}"
        row["reference"] = f"{res.get('passes', '?')} pass(es) per window"
        if ballast:
            row["reference"] += f", {free_gb:g} GiB left free"
            row["status"] = fallback_status(exc, res["warnings"], device.type == "cuda")
        elif exc is None:
            row["status"] = "ok"
        elif isinstance(exc, PredictionStopped):
            done, total = res["forwards"], res["forwards_total"]
            guess = res["seconds"] * total / done if done else float("nan")
            row["status"] = f"time box: {done} of {total} forward passes (whole case ~{guess:.0f} s)"
        else:
            row["status"] = "crashed: OOM" if _is_oom(exc) else f"crashed: {type(exc).__name__}: {str(exc)[:160]}"
    return rows


def split_dataset(data: Path, root: Path, cases: int | None, held_out: int) -> tuple[Path, Path, Path, list[str]]:
    """Copy ``data`` (its first ``cases`` cases) into ``root/data`` without its last ``held_out`` cases, whose
    images go to ``root/held_images`` and labels to ``root/held_labels``.

    Returns:
        ``(dataset copy, held-out images, held-out labels, held-out case ids)``.
    """
    ds = load_dataset(data)
    chosen = sorted(ds.cases, key=lambda c: c.case_id)[: cases or None]
    if len(chosen) <= held_out:
        raise ValueError(f"{data} has {len(chosen)} case(s); need more than the {held_out} held out")
    train, held = chosen[:-held_out], chosen[-held_out:]
    dst, images, labels = root / "data", root / "held_images", root / "held_labels"
    for folder in (dst / "imagesTr", dst / "labelsTr", images, labels):
        folder.mkdir(parents=True, exist_ok=True)
    for c in train:
        for f in c.image_files:
            shutil.copy(f, dst / "imagesTr" / f.name)
        assert c.label_file is not None
        shutil.copy(c.label_file, dst / "labelsTr" / c.label_file.name)
    for c in held:
        for f in c.image_files:
            shutil.copy(f, images / f.name)
        assert c.label_file is not None
        shutil.copy(c.label_file, labels / c.label_file.name)
    meta = json.loads((data / "dataset.json").read_text())
    kept = {c.label_file.name for c in train if c.label_file is not None}
    if isinstance(meta.get("training"), list):
        meta["training"] = [e for e in meta["training"] if Path(str(e.get("label", ""))).name in kept]
    meta["numTraining"] = len(train)
    (dst / "dataset.json").write_text(json.dumps(meta, indent=1))
    return dst, images, labels, [c.case_id for c in held]


def _shrink_networks(work: Path, base_features: int = 8) -> None:
    path = WorkDir(work).plans
    plan = json.loads(path.read_text())
    for cfg in plan["configurations"].values():
        for net in cfg["networks"].values():
            net["spec"]["base_features"], net["spec"]["max_features"] = base_features, 8 * base_features
    path.write_text(json.dumps(plan, indent=1))


def real_run_part(
    data: Path, scratch: Path, device: torch.device, gpu_memory_gb: float, minutes: float, held_out: int, dry_run: bool
) -> list:
    """plan -> train -> predict -> evaluate on the carried hippocampus cases (see the module docstring)."""
    root = scratch / "real_run"
    if root.exists():
        shutil.rmtree(root)
    rows: list[dict[str, Any]] = []
    dev = device.type
    row: dict[str, Any] = {"part": "real run", "row": "hippocampus plan + train + predict", "values": {}}
    rows.append(row)
    try:
        copy, images, labels, held = split_dataset(data, root, 8 if dry_run else None, 2 if dry_run else held_out)
    except Exception as exc:  # noqa: BLE001
        row["status"] = f"crashed: {type(exc).__name__}: {exc}"
        return rows
    work, pred, metrics = root / "work", root / "pred", root / "metrics.json"
    train = (
        ["--epochs", "1", "--iters-per-epoch", "2", "--num-workers", "0"]
        if dry_run
        else ["--time-budget", f"{minutes:g}"]
    )
    workers = ["--num-workers", "1"] if dry_run else []  # no worker processes to start on a small CPU
    commands = [
        ("plan", ["plan", str(copy), "-o", str(work), "--device", dev, "--gpu-memory-gb", f"{gpu_memory_gb:g}", *workers]),
        ("train", ["train", str(work), "--fold", "all", "--device", dev, "--no-validation", *train]),
        ("predict", ["predict", "-i", str(images), "-o", str(pred), "-m", str(work), "--device", dev, *workers]),
        ("evaluate", ["evaluate", str(pred), str(labels), "-o", str(metrics), *workers]),
    ]  # fmt: skip
    seconds = row["values"]
    for name, argv in commands:
        t0 = time.perf_counter()
        rc = medseg_main(argv)
        seconds[f"{name}_s"] = time.perf_counter() - t0
        if rc != 0:
            row["status"] = f"crashed: medseg {name} exited {rc}"
            return rows
        if name == "plan" and dry_run:
            _shrink_networks(work, base_features=4)
    plan = Plan.load(WorkDir(work).plans)
    run = WorkDir(work).run(plan.default_configuration, plan.configuration().default_arch, "all")
    progress = json.loads(run.progress.read_text()) if run.progress.is_file() else {}
    run_plan = Plan.load(run.plans) if run.plans.is_file() else plan
    net = run_plan.configuration().network()
    row["setting"] = (
        f"{len(held)} held out, {plan.default_configuration} patch {'x'.join(map(str, net.patch_size))} "
        f"batch {net.batch_size} {net.precision}"
    )
    seconds["iterations"] = progress.get("iteration")
    seconds["budget_chosen"] = (run_plan.notes.get("budget") or {}).get("chosen") if run_plan.notes else None
    row["measured"] = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in seconds.items() if k.endswith("_s"))
    row["measured"] += f", {seconds['iterations']} iterations"
    row["status"] = "ok"
    result = json.loads(metrics.read_text())
    for label, values in result["mean"].items():
        dice = values.get("dice")
        ref = NNUNET_HIPPOCAMPUS_CV.get(int(label))
        rows.append(
            {
                "part": "real run",
                "row": f"Dice class {label}",
                "setting": f"mean of {len(held)} held-out cases",
                "measured": "n/a" if dice is None else f"{dice:.4f}",
                "reference": f"nnU-Net 5-fold CV {ref}" if ref else "",
                "values": {"dice": dice},
                "status": "ok" if dice is not None else "no value",
            }
        )
    return rows
