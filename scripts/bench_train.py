"""Benchmark: training iterations per second of medseg's trainer against nnU-Net v2's own trainer.

Both train the same 3D U-Net-size problem on the same machine: the shared hippocampus data (default),
patch ``[40, 56, 40]`` and batch 9 (nnU-Net's plan for it; both configurable), fold 0, with their full
data pipelines (patch sampling, augmentation in background workers). medseg is timed through
:func:`medseg.training.train` (an epoch of warm-up, then one timed epoch, ``it/s`` as the trainer
reports it including any wait for data) for each precision / memory-format setting; nnU-Net through its
``nnUNetTrainer`` (``train_step`` on batches from its own data loader) after
``nnUNetv2_plan_and_preprocess``. A table with both and the ratio is printed.

``--time-budget MINUTES`` additionally trains medseg on fold 0 for that budget (learning rate annealed
over elapsed time) and reports the validation Dice of the held-out cases.

nnU-Net is optional; install it into its own environment, e.g.::

    python3 -m venv /work/nnunet_venv
    /work/nnunet_venv/bin/pip install torch==2.13.0 && /work/nnunet_venv/bin/pip install nnunetv2
    python scripts/bench_train.py --nnunet-bin-dir /work/nnunet_venv/bin

Nothing is written next to the input data; everything goes to a temporary folder (or ``--work``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"
NNUNET_DATASET_ID = 988

NNUNET_SNIPPET = r"""
import json, os, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
from nnunetv2.run.run_training import get_trainer_from_args
trainer = get_trainer_from_args(sys.argv[1], "3d_fullres", 0, "nnUNetTrainer", "nnUNetPlans", device=torch.device("cpu"))
cfg = trainer.configuration_manager.configuration
cfg["batch_size"] = int(sys.argv[2])
cfg["patch_size"] = [int(v) for v in sys.argv[6].split(",")]
trainer.initialize()
trainer.on_train_start()
warmup, iters = int(sys.argv[3]), int(sys.argv[4])
trainer.network.train()
for _ in range(warmup):
    trainer.train_step(next(trainer.dataloader_train))
t = time.perf_counter()
for _ in range(iters):
    trainer.train_step(next(trainer.dataloader_train))
dt = time.perf_counter() - t
print("RESULT " + json.dumps({"it_per_s": iters / dt, "batch_size": trainer.batch_size,
                               "patch_size": list(trainer.configuration_manager.patch_size)}), flush=True)
os._exit(0)
"""


def prepare_medseg(data: Path, work: Path, num_workers: int) -> None:
    """``medseg plan`` (3d_fullres only) into ``work`` unless it is already there."""
    from medseg.io.workdir import WorkDir
    from medseg.pipeline import plan_and_preprocess
    from medseg.planning.planner import PlannerOptions

    if WorkDir(work).plans.is_file() and WorkDir(work).preprocessed_root.is_dir():
        return
    plan_and_preprocess(data, work, PlannerOptions(device="cpu"), configs=["3d_fullres"], num_workers=num_workers)


def set_network(work: Path, patch: list[int], batch: int, base_features: int | None) -> None:
    """Rewrite the 3d_fullres default network of ``work/plans.json`` with the benchmark's patch, batch, width."""
    from medseg.io.workdir import WorkDir
    from medseg.planning.plan import Plan

    plan = Plan.load(WorkDir(work).plans)
    cfg = plan.configuration("3d_fullres")
    net = cfg.network()
    changes: dict = {"patch_size": tuple(patch), "batch_size": batch}
    if base_features is not None:
        spec = net.spec
        changes["spec"] = dataclasses.replace(
            spec,
            base_features=base_features,
            max_features=max(base_features, spec.max_features * base_features // spec.base_features),
        )
    net = dataclasses.replace(net, **changes)
    cfg = dataclasses.replace(cfg, networks={**cfg.networks, cfg.default_arch: net})
    plan = dataclasses.replace(
        plan,
        configurations={**plan.configurations, "3d_fullres": cfg},
        default_configuration="3d_fullres",
        time_budget_minutes=None,
    )
    plan.validate().save(WorkDir(work).plans)


def time_medseg(work: Path, iters: int, precision: str, channels_last: bool, threads: int, workers: int) -> float:
    """Iterations per second of the second of two epochs of ``iters`` iterations."""
    from medseg.io.workdir import RunDir, WorkDir
    from medseg.training import TrainConfig, train

    runs = WorkDir(work).runs_root
    if runs.exists():
        shutil.rmtree(runs)
    cfg = TrainConfig(
        configuration="3d_fullres",
        fold=0,
        epochs=2,
        iters_per_epoch=iters,
        val_iters=0,
        precision=precision,
        channels_last=channels_last,
        num_threads=threads,
        num_workers=workers,
        final_validation=False,
    )
    run = train(work, cfg)
    history = json.loads(RunDir(run).progress.read_text())["history"]
    return float(history[-1]["it_per_s"])


def convert_to_nnunet(data: Path, raw_root: Path) -> Path:
    """nnU-Net v2 raw dataset (symbolic links to the original files, ``_0000`` naming) under ``raw_root``."""
    from medseg.io.dataset import load_dataset

    ds = load_dataset(data)
    out = raw_root / f"Dataset{NNUNET_DATASET_ID:03d}_{''.join(ch for ch in ds.name if ch.isalnum()) or 'Bench'}"
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    for case in ds.cases:
        for c, src in enumerate(case.image_files):
            os.symlink(Path(src).resolve(), out / "imagesTr" / f"{case.case_id}_{c:04d}{ds.file_ending}")
        if case.label_file is not None:
            os.symlink(Path(case.label_file).resolve(), out / "labelsTr" / f"{case.case_id}{ds.file_ending}")
    meta = {
        "channel_names": {str(i): n for i, n in enumerate(ds.channel_names)},
        "labels": {n: int(i) for n, i in zip(ds.label_names, ds.label_ids)},
        "numTraining": len(ds.cases),
        "file_ending": ds.file_ending,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out


def time_nnunet(
    bin_dir: Path,
    data: Path,
    tmp: Path,
    batch: int,
    patch: list[int],
    warmup: int,
    iters: int,
    threads: int,
    da_procs: int,
) -> dict:
    env = dict(os.environ, nnUNet_n_proc_DA=str(da_procs))
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp / var).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / var)
    convert_to_nnunet(data, tmp / "nnUNet_raw")
    prep = [
        str(bin_dir / "nnUNetv2_plan_and_preprocess"),
        "-d",
        str(NNUNET_DATASET_ID),
        "-c",
        "3d_fullres",
        "-np",
        "2",
        "-npfp",
        "2",
    ]
    proc = subprocess.run(prep, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(prep)} failed:\n{proc.stderr[-3000:]}")
    python = bin_dir / "python"
    cmd = [
        str(python),
        "-c",
        NNUNET_SNIPPET,
        str(NNUNET_DATASET_ID),
        str(batch),
        str(warmup),
        str(iters),
        str(threads),
        ",".join(map(str, patch)),
    ]
    # nnU-Net's augmentation worker processes can outlive its main process and would keep a pipe open
    # forever: collect the output in files and end the whole process group once the main process exits.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        returncode = proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"nnU-Net trainer run failed ({returncode}):\n{stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def budget_run(work: Path, minutes: float, threads: int | None, workers: int | None) -> dict:
    from medseg.io.workdir import RunDir, WorkDir
    from medseg.training import TrainConfig, train

    runs = WorkDir(work).runs_root
    if runs.exists():
        shutil.rmtree(runs)
    t = time.perf_counter()
    run = train(
        work,
        TrainConfig(
            configuration="3d_fullres",
            fold=0,
            time_budget_minutes=minutes,
            keep_plan=True,
            num_threads=threads,
            num_workers=workers,
        ),
    )
    wall = time.perf_counter() - t
    metrics = json.loads(RunDir(run).validation_metrics.read_text())
    ckpt_history = json.loads(RunDir(run).progress.read_text())["history"]
    return {
        "wall_s": wall,
        "iterations": ckpt_history[-1]["iteration"] if ckpt_history else 0,
        "mean_dice": metrics["mean_dice"],
        "label_names": metrics["label_names"],
        "num_cases": metrics["num_cases"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (MSD or nnU-Net v2 layout)")
    parser.add_argument("--work", type=Path, default=None, help="medseg work folder to reuse (default: temporary)")
    parser.add_argument("--patch", type=int, nargs=3, default=[40, 56, 40], help="patch (Z Y X)")
    parser.add_argument("--batch", type=int, default=9)
    parser.add_argument(
        "--base-features",
        type=int,
        default=None,
        help="override the plan's width (both tools: medseg only; nnU-Net always uses its plan)",
    )
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per setting")
    parser.add_argument("--warmup", type=int, default=2, help="nnU-Net warm-up iterations")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--workers", type=int, default=1, help="medseg data workers")
    parser.add_argument("--nnunet-da-procs", type=int, default=2, help="nnU-Net augmentation processes")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--force-bf16", action="store_true", help="time bf16 even without native CPU support")
    parser.add_argument("--nnunet-bin-dir", type=Path, default=None, help="folder of the nnU-Net venv's bin/")
    parser.add_argument("--skip-nnunet", action="store_true")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="also train fold 0 for this budget and report the validation Dice",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from medseg.machine import cpu_has_fast_bf16
    from medseg.training.device import default_num_threads

    if not args.data.is_dir():
        print(f"error: {args.data}: dataset folder not found", file=sys.stderr)
        return 2
    threads = args.threads or default_num_threads()
    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench_train_")
    tmp = Path(tmp_ctx.name)
    work = args.work or tmp / "medseg_work"
    try:
        prepare_medseg(args.data, work, num_workers=2)
        set_network(work, args.patch, args.batch, args.base_features)
        rows: list[tuple[str, float | None]] = []
        for precision in args.precisions:
            for cl in args.channels_last:
                label = f"medseg {precision} channels-last {cl}"
                if precision == "bf16" and not cpu_has_fast_bf16() and not args.force_bf16:
                    rows.append((label + " (no native bf16 on this CPU; --force-bf16 to time it)", None))
                    continue
                rows.append((label, time_medseg(work, args.iters, precision, cl == "on", threads, args.workers)))
                print(f"{label}: {rows[-1][1]:.3f} it/s", flush=True)
        nn = None
        bin_dir = args.nnunet_bin_dir
        if bin_dir is None and shutil.which("nnUNetv2_plan_and_preprocess"):
            bin_dir = Path(shutil.which("nnUNetv2_plan_and_preprocess")).parent
        if not args.skip_nnunet and bin_dir is not None and (bin_dir / "nnUNetv2_plan_and_preprocess").is_file():
            nn = time_nnunet(
                bin_dir,
                args.data,
                tmp / "nnunet",
                args.batch,
                args.patch,
                args.warmup,
                args.iters,
                threads,
                args.nnunet_da_procs,
            )
            print(f"nnU-Net fp32: {nn['it_per_s']:.3f} it/s", flush=True)
        budget = None
        if args.time_budget is not None:
            set_network(work, args.patch, args.batch, args.base_features)
            budget = budget_run(work, args.time_budget, args.threads, None)
    finally:
        tmp_ctx.cleanup()

    print(
        f"\nbench_train: {args.data.name}, patch {args.patch}, batch {args.batch}, {threads} thread(s), "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_fast_bf16()}"
    )
    print(f"{'setting':<64}{'it/s':>8}{'vs nnU-Net':>12}")
    for label, ips in rows:
        ratio = f"{ips / nn['it_per_s']:.2f}x" if (nn and ips) else "-"
        print(f"{label:<64}{(f'{ips:.3f}' if ips else '-'):>8}{ratio:>12}")
    if nn is not None:
        print(
            f"{'nnU-Net v2 nnUNetTrainer fp32 (its own loader, ' + str(args.nnunet_da_procs) + ' DA procs)':<64}"
            f"{nn['it_per_s']:>8.3f}{'1.00x':>12}"
        )
    elif not args.skip_nnunet:
        print(
            "\nnnU-Net v2 not found; to compare, install it in its own environment:\n"
            "  python3 -m venv /work/nnunet_venv && /work/nnunet_venv/bin/pip install torch==2.13.0 && "
            "/work/nnunet_venv/bin/pip install nnunetv2\n"
            "  then: python scripts/bench_train.py --nnunet-bin-dir /work/nnunet_venv/bin"
        )
    if budget is not None:
        names = budget["label_names"][1:]
        dice = ", ".join(f"{n} {v:.4f}" for n, v in zip(names, budget["mean_dice"].values()) if v is not None)
        print(
            f"\n--time-budget {args.time_budget:g}: {budget['iterations']} iterations, wall {budget['wall_s'] / 60:.1f} "
            f"min, fold-0 validation Dice ({budget['num_cases']} cases): {dice}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
