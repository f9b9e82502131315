"""A/B of training settings on one plan: train each arm on the same work folder, predict a held-out set, score.

    python scripts/bench_arms.py WORK TEST_IMAGES TEST_LABELS -o OUT \\
        --arm on="--intensity-augmentation on" --arm off="--intensity-augmentation off" [--concurrent] \\
        [--predict-args NAME="--arch segresnet"]

Each arm gets its own copy of ``WORK`` (plan and preprocessed cache; any ``runs/`` left out), trains with
``medseg train COPY --fold all <its arguments>`` (``--fold K``: that fold, whose final validation Dice
is reported too; ``--find-best`` then fits each arm's postprocessing, temperature and quality score), predicts ``TEST_IMAGES`` with ``medseg predict`` (its
defaults: postprocessing, prediction budget) and is scored by ``medseg evaluate`` against ``TEST_LABELS``.
With ``--concurrent`` the arms train at the same time (they then share the machine alike, which is what
makes a pair fair on a machine that other work also uses); predictions always run one after another.
``--reuse NAME=TRAINED_WORK`` adds an arm trained earlier on the same plan (e.g. the plain run of an earlier
idle-machine benchmark): its work folder is copied whole, not retrained, and scored like the others.

Prints one row per arm: iterations, training wall seconds, prediction seconds, mean foreground Dice and
HD95, and the Dice per label; writes the same as ``OUT/arms.json``. Nothing is written next to the inputs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _medseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "medseg", *args]


def _copy_work(work: Path, dst: Path, runs: bool = False) -> None:
    """``work`` copied to ``dst`` (replacing it); its ``runs/`` only with ``runs`` (a reused arm)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(work, dst, ignore=lambda folder, names: ["runs"] if not runs and Path(folder) == work else [])


def _iterations(run_root: Path, fold: str) -> int | None:
    """Iterations of the arm's run: the last epoch entry of its ``progress.json``."""
    for progress in sorted(run_root.glob(f"runs/*/*/fold_{fold}/progress.json")):
        history = json.loads(progress.read_text()).get("history") or []
        if history and isinstance(history[-1].get("iteration"), int):
            return int(history[-1]["iteration"])
    return None


def _elapsed(run_root: Path, fold: str) -> float:
    """Training seconds of a reused arm: its ``progress.json`` ``elapsed_seconds``."""
    for progress in sorted(run_root.glob(f"runs/*/*/fold_{fold}/progress.json")):
        return float(json.loads(progress.read_text())["elapsed_seconds"])
    raise SystemExit(f"{run_root}: no runs/*/*/fold_{fold}/progress.json to reuse")


def _fold_dice(run_root: Path, fold: str) -> float | None:
    """Mean foreground Dice of the run's final validation (``validation/metrics.json``), None for fold all."""
    for metrics in sorted(run_root.glob(f"runs/*/*/fold_{fold}/validation/metrics.json")):
        value = json.loads(metrics.read_text()).get("mean_foreground_dice")
        return float(value) if value is not None else None
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="planned and preprocessed work folder (`medseg plan`)")
    ap.add_argument("test_images", type=Path)
    ap.add_argument("test_labels", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--arm", action="append", default=[], help='NAME="medseg train arguments"')
    ap.add_argument(
        "--reuse",
        action="append",
        default=[],
        help="NAME=TRAINED_WORK: an arm already trained (same plan) in that work folder, copied whole and not "
        "retrained; its training seconds are its run's progress.json elapsed_seconds",
    )
    ap.add_argument(
        "--predict-args",
        action="append",
        default=[],
        help='NAME="medseg predict arguments" for an arm (e.g. --arch segresnet, --checkpoint snapshots)',
    )
    ap.add_argument("--concurrent", action="store_true", help="train the arms at the same time")
    ap.add_argument(
        "--fold",
        default="all",
        help="fold to train (default all); with 0-4 the run's final validation Dice of that fold is reported too",
    )
    ap.add_argument(
        "--find-best",
        action="store_true",
        help="run `medseg find-best` on each arm before predicting (needs a fold with validation)",
    )
    args = ap.parse_args(argv)
    predict_args: dict[str, list[str]] = {}
    for spec in args.predict_args:
        name, _, extra = spec.partition("=")
        predict_args[name] = shlex.split(extra)

    arms: dict[str, list[str]] = {}
    for spec in args.arm:
        name, _, extra = spec.partition("=")
        arms[name] = shlex.split(extra)
    reused: dict[str, Path] = {}
    for spec in args.reuse:
        name, _, folder = spec.partition("=")
        reused[name] = Path(folder)
    if not arms and not reused:
        ap.error("give at least one --arm or --reuse")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in arms:
        _copy_work(args.work, args.out / f"work_{name}")
    for name, folder in reused.items():
        _copy_work(folder, args.out / f"work_{name}", runs=True)

    started: dict[str, float] = {}
    walls: dict[str, float] = {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name, extra in arms.items():
        log = (args.out / f"train_{name}.log").open("wb")
        started[name] = time.perf_counter()
        procs[name] = subprocess.Popen(
            _medseg("train", str(args.out / f"work_{name}"), "--fold", args.fold, *extra), stdout=log, stderr=log
        )
        if not args.concurrent:
            if procs[name].wait() != 0:
                raise SystemExit(f"arm {name}: training failed, see {log.name}")
            walls[name] = time.perf_counter() - started[name]
    for name, proc in procs.items():
        if name not in walls:
            if proc.wait() != 0:
                raise SystemExit(f"arm {name}: training failed, see train_{name}.log")
            walls[name] = time.perf_counter() - started[name]

    for name in reused:
        walls[name] = _elapsed(args.out / f"work_{name}", args.fold)

    rows: list[dict[str, Any]] = []
    for name in [*arms, *reused]:
        if args.find_best:
            subprocess.run(_medseg("find-best", str(args.out / f"work_{name}"), "-q"), check=True)
        pred = args.out / f"pred_{name}"
        t = time.perf_counter()
        subprocess.run(
            _medseg(
                "predict",
                "-i",
                str(args.test_images),
                "-o",
                str(pred),
                "-m",
                str(args.out / f"work_{name}"),
                "-q",
                *predict_args.get(name, []),
            ),
            check=True,
        )
        predict_s = time.perf_counter() - t
        metrics_path = args.out / f"metrics_{name}.json"
        subprocess.run(_medseg("evaluate", str(pred), str(args.test_labels), "-o", str(metrics_path), "-q"), check=True)
        metrics = json.loads(metrics_path.read_text())
        rows.append(
            {
                "arm": name,
                "train_args": arms.get(name, []),
                **({"reused_from": str(reused[name])} if name in reused else {}),
                "iterations": _iterations(args.out / f"work_{name}", args.fold),
                "fold_dice": _fold_dice(args.out / f"work_{name}", args.fold),
                "train_s": round(walls[name], 1),
                "predict_s": round(predict_s, 1),
                "dice": metrics["foreground_mean"]["dice"],
                "hd95": metrics["foreground_mean"]["hd95"],
                "dice_per_label": {k: v["dice"] for k, v in metrics["mean"].items()},
                "dice_per_case": {
                    c["case"]: round(sum(v["dice"] for v in c["labels"].values()) / len(c["labels"]), 4)
                    for c in metrics["cases"]
                },
            }
        )
    (args.out / "arms.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(
        "| arm | iterations | train s | predict s | fold Dice | mean Dice | HD95 (mm) | Dice per label | Dice per case |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        labels = ", ".join(f"{k}: {v:.3f}" for k, v in r["dice_per_label"].items())
        cases = ", ".join(f"{k}: {v:.3f}" for k, v in r["dice_per_case"].items())
        print(
            f"| {r['arm']} | {r['iterations']} | {r['train_s']:.0f} | {r['predict_s']:.1f} | "
            f"{'-' if r['fold_dice'] is None else format(r['fold_dice'], '.4f')} | {r['dice']:.4f} | "
            f"{r['hd95']:.1f} | {labels} | {cases} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
