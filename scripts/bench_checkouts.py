"""Plan time and training-step time of two checkouts of medseg, side by side in one run (before/after a refactor).

Usage::

    git worktree add --detach /tmp/before <rev>
    .venv/bin/python scripts/bench_checkouts.py --before /tmp/before --after . [--data DIR] [--rounds 3]

Each checkout runs as its own child process (``PYTHONPATH=<checkout> python -m medseg ...``) on a private copy of
the dataset (default: the shared hippocampus data), in turns before/after/before/after... so that a drifting
machine load affects both alike. Per round and checkout:

- **plan**: wall seconds of ``medseg plan DATA -o WORK --num-workers N --gpu-memory-gb G`` (validate, fingerprint, plan, preprocess);
- **step**: ``medseg train WORK --fold F --epochs E --iters-per-epoch I --no-validation --device cpu
  --precision fp32 --num-workers 0`` on that plan's default configuration; the step time is the median over the
  epochs after the first of the epoch's seconds per iteration (``progress.json``, the trainer's own figures).

The two checkouts' plans must describe the same thing: the after checkout loads the before checkout's
``plans.json`` (older schema versions are migrated on load) and both plans are compared as the after checkout
serialises them; a difference is printed and makes the exit status 1. Prints a Markdown table (median, min, max
per figure and the after/before ratio of the medians). Nothing is written next to the input data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"

_SAME_PLAN = """
import json, sys
from medseg.planning.plan import Plan
a = Plan.from_dict(json.loads(open(sys.argv[1]).read()))
b = Plan.from_dict(json.loads(open(sys.argv[2]).read()))
da, db = a.to_dict(), b.to_dict()
for d in (da, db):
    d.get("notes", {}).pop("timing", None)
print(json.dumps({"same": da == db, "before": da, "after": db}))
"""


def _run(checkout: Path, args: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "medseg", *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: medseg {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def _step_seconds(work: Path, fold: str) -> float:
    runs = sorted(work.glob(f"runs/*/*/fold_{fold}/progress.json"))
    if not runs:
        raise SystemExit(f"no progress.json under {work}/runs")
    history = json.loads(runs[0].read_text())["history"]
    per_step = [
        e["epoch_seconds"] / e["iterations"] if "epoch_seconds" in e else 1.0 / e["it_per_s"]
        for e in history[1:]
        if e.get("iterations")
    ]
    if not per_step:
        raise SystemExit(f"{runs[0]}: no timed epoch after the first: {history}")
    return statistics.median(per_step)


def _describe(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", type=Path, required=True, help="checkout measured as the baseline")
    p.add_argument("--after", type=Path, default=REPO, help="checkout measured against it (default: this one)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iters-per-epoch", type=int, default=15)
    p.add_argument(
        "--gpu-memory-gb", default="8", help="`medseg plan --gpu-memory-gb` (a smaller network: faster rounds)"
    )
    p.add_argument("--fold", default="0", help="fold to train (`all` for a dataset of fewer than 5 cases)")
    args = p.parse_args(argv)
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    figures: dict[str, dict[str, list[float]]] = {k: {"plan": [], "step": []} for k in checkouts}
    with tempfile.TemporaryDirectory(prefix="medseg_bench_checkouts_") as tmp:
        root = Path(tmp)
        data = root / "data"
        shutil.copytree(args.data, data)
        for r in range(args.rounds):
            for name, checkout in checkouts.items():
                work = root / f"{name}_{r}"
                figures[name]["plan"].append(
                    _run(
                        checkout,
                        [
                            "plan",
                            str(data),
                            "-o",
                            str(work),
                            "--num-workers",
                            str(args.num_workers),
                            "--gpu-memory-gb",
                            args.gpu_memory_gb,
                        ],
                        root,
                    )
                )
                _run(
                    checkout,
                    [
                        "train",
                        str(work),
                        "--fold",
                        args.fold,
                        "--epochs",
                        str(args.epochs),
                        "--iters-per-epoch",
                        str(args.iters_per_epoch),
                        "--no-validation",
                        "--device",
                        "cpu",
                        "--precision",
                        "fp32",
                        "--num-workers",
                        "0",
                    ],
                    root,
                )
                figures[name]["step"].append(_step_seconds(work, args.fold))
                print(
                    f"round {r} {name}: plan {figures[name]['plan'][-1]:.2f} s, step {figures[name]['step'][-1]:.3f} s",
                    flush=True,
                )
        env = {**os.environ, "PYTHONPATH": str(checkouts["after"])}
        cmp = subprocess.run(
            [
                sys.executable,
                "-c",
                _SAME_PLAN,
                str(root / "before_0" / "plans.json"),
                str(root / "after_0" / "plans.json"),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if cmp.returncode != 0:
            raise SystemExit(f"comparing the plans failed:\n{cmp.stderr[-3000:]}")
        same = json.loads(cmp.stdout)
    print(
        f"\ndata {args.data}, --gpu-memory-gb {args.gpu_memory_gb}, {args.epochs} x {args.iters_per_epoch} "
        f"iterations, {args.rounds} rounds, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    )
    print("| figure | before (median, min-max) | after (median, min-max) | after / before |")
    print("|---|---|---|---|")
    for fig, unit in (("plan", "s"), ("step", "s/iteration")):
        b, a = figures["before"][fig], figures["after"][fig]
        print(
            f"| {fig} ({unit}) | {_describe(b)} | {_describe(a)} | {statistics.median(a) / statistics.median(b):.3f} |"
        )
    print(f"\nplans describe the same thing: {same['same']}")
    if not same["same"]:
        before, after = same["before"], same["after"]
        keys = sorted(set(before) | set(after))
        for k in keys:
            if before.get(k) != after.get(k):
                print(f"  differs at {k!r}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
