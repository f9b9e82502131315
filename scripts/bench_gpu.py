"""The GPU check (issue 40): memory model, throughput, prediction and a real run on one CUDA card; one table.

    python scripts/bench_gpu.py --out OUT                  # on a GPU machine: about 7-8 minutes on an H100
    python scripts/bench_gpu.py --dry-run --out OUT        # on the CPU, tiny shapes, every part (< 1 minute)
    bash scripts/gpu_check.sh                              # the device machine: wheels + this, into $OUT

Parts, each in a child process of its own (a part that crashes, even natively, records its error and the
others go on; the parent never touches CUDA, so each child has the card to itself) and each time-boxed
so that the whole run ends within ``--time-limit`` seconds:

* ``info``: card, driver, torch/CUDA/cuDNN versions; the card's memory is the default ``--gpu-memory-gb``;
* ``memory``: four plans made for the card (``scripts/bench_gpu_train.py``), 20 real training steps each,
  estimate vs ``max_memory_allocated`` / ``max_memory_reserved`` (target 0.85-1.10x, reserved <= target);
* ``throughput``: fp32 / fp16 / bf16 x channels-last off / on, iterations per second and TFLOP/s against
  the card's peak; whether the run's own setting is the fastest;
* ``prediction``: a 155x240x240 4-channel and a 512x512x300 one-channel case with 8-flip TTA, and a case
  whose accumulator does not fit the GPU (``scripts/bench_gpu_predict.py``);
* ``real_run``: ``medseg plan`` + ``medseg train --time-budget 3 --device cuda`` on the carried hippocampus
  cases, then predict and score the held-out ones (Dice per class).

Writes ``OUT/gpu_check.md`` (the table, as printed) and ``OUT/gpu_check.json`` (every number). Rows whose
status starts with ``OFF`` or ``crashed`` missed their target. Sizes in GiB (2**30 bytes), times in seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CARRIED_DATA = ROOT / ".gpu_check" / "hippocampus"
SHARED_DATA = ROOT.parent / "shared" / "data" / "hippocampus"
PARTS = ("info", "memory", "throughput", "prediction", "real_run")
#: the most seconds each part may take, and the least it is left when earlier parts ran long
BOX_S = {"info": 60, "memory": 150, "throughput": 60, "prediction": 120, "real_run": 300}
MIN_S = {"info": 20, "memory": 60, "throughput": 25, "prediction": 40, "real_run": 235}
DRY_BOX_S = 120
_RUNNING: list[subprocess.Popen[bytes]] = []  # the part's child process while one runs
COLUMNS = ("part", "row", "setting", "measured", "reference", "check", "status")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every part on the CPU on tiny shapes (no GPU needed)")
    p.add_argument("--out", required=True, help="folder for gpu_check.md and gpu_check.json")
    p.add_argument(
        "--data",
        default=None,
        help=f"hippocampus dataset (default {CARRIED_DATA} when present, else {SHARED_DATA})",
    )
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="planner memory target (default: the card's)")
    p.add_argument("--train-minutes", type=float, default=3.0, help="real run: train --time-budget (default 3)")
    p.add_argument("--held-out", type=int, default=20, help="real run: cases held out and scored (default 20)")
    p.add_argument("--steps", type=int, default=20, help="memory: training steps per plan (default 20)")
    p.add_argument("--throughput-batch", type=int, default=2, help="throughput: batch size (default 2)")
    p.add_argument("--throughput-steps", type=int, default=10, help="throughput: steps per setting (default 10)")
    p.add_argument("--fallback-free-gb", type=float, default=2.0, help="prediction: GPU memory left free (2)")
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds for the whole check (default 480)")
    p.add_argument("--parts", nargs="+", choices=PARTS[1:], default=list(PARTS[1:]), help="parts to run")
    p.add_argument("--part", choices=PARTS, default=None, help=argparse.SUPPRESS)  # a child process's part
    p.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    p.add_argument("--box", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def part_box(part: str, later: list[str], remaining: float, dry_run: bool) -> float:
    """Seconds ``part`` may take: its own box, less what the ``later`` parts need at least."""
    if dry_run:
        return min(DRY_BOX_S, max(remaining, 1.0))
    return max(1.0, min(BOX_S[part], remaining - sum(MIN_S[p] for p in later)))


# ------------------------------------------------------------------------------------------- child
def _info(dry_run: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "date": str(datetime.date.today())}
    if dry_run:
        return {**info, "device": "cpu", "card": "CPU (dry run)", "memory_gb": None}
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: run on a GPU machine, or pass --dry-run")
    props = torch.cuda.get_device_properties(0)
    info.update(
        device="cuda",
        card=props.name,
        memory_gb=props.total_memory / 2**30,
        multiprocessors=props.multi_processor_count,
        cudnn=torch.backends.cudnn.version(),
        bf16=torch.cuda.is_bf16_supported(),
    )
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["driver"] = smi.stdout.strip() or "unknown"
    except OSError:
        info["driver"] = "unknown (no nvidia-smi)"
    return info


def run_part(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``args.part`` in this (child) process; its rows (and the info part's facts)."""
    if args.part == "info":
        return {"info": _info(args.dry_run)}
    import bench_gpu_predict as predict_parts
    import bench_gpu_train as train_parts
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    deadline = time.perf_counter() + float(args.box or BOX_S[args.part])
    scratch, data = Path(args.scratch), Path(args.data)
    if args.part == "real_run":
        return {
            "rows": predict_parts.real_run_part(
                data, scratch, device, args.gpu_memory_gb, args.train_minutes, args.held_out, args.dry_run
            )
        }
    plans = train_parts.make_plans(data, scratch, args.gpu_memory_gb, device.type, args.dry_run)
    if args.part == "memory":
        steps = min(args.steps, 2) if args.dry_run else args.steps
        return {"rows": train_parts.memory_part(plans, device, args.gpu_memory_gb, steps, deadline)}
    if args.part == "throughput":
        steps = min(args.throughput_steps, 1) if args.dry_run else args.throughput_steps
        return {"rows": train_parts.throughput_part(plans, device, args.throughput_batch, steps + 2, deadline)}
    return {"rows": predict_parts.prediction_part(plans, device, args.dry_run, args.fallback_free_gb, deadline)}


# ------------------------------------------------------------------------------------------- parent
def _child(argv: list[str], part: str, scratch: Path, box: float, extra: list[str]) -> tuple[dict[str, Any], str]:
    """Run one part in a child process; ``(its result, status)`` (an empty result when it died)."""
    result_path = scratch / f"{part}.result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--part", part, "--scratch", str(scratch)]
    cmd += ["--box", f"{box:.0f}", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    # a process group of its own: at the time box the whole group goes (data workers, step probes included)
    proc = subprocess.Popen(cmd, env=env, process_group=0)
    _RUNNING[:] = [proc]
    try:
        rc = proc.wait(timeout=box + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {}, f"killed at its time box ({box:.0f} s + 30 s)"
    finally:
        _RUNNING.clear()
    if rc != 0 or not result_path.is_file():
        return {}, f"crashed: exit {rc} after {time.perf_counter() - t0:.0f} s (see the log above)"
    return json.loads(result_path.read_text()), "ok"


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM/SIGINT of the parent (an outer ``timeout``): take the running part's process group along."""
    for proc in _RUNNING:
        os.killpg(proc.pid, signal.SIGKILL)
    sys.exit(128 + signum)


def _clean(v: Any) -> Any:
    """``v`` with NaN/inf as None (strict JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def render_table(info: dict[str, Any], rows: list[dict[str, Any]], command: str, target_gb: float | None) -> str:
    """The markdown table (and its header lines) of a check."""
    head = [
        f"GPU check: {info.get('card', '?')}, driver {info.get('driver', 'n/a')}, torch {info.get('torch', '?')} "
        f"(CUDA {info.get('cuda')}, cuDNN {info.get('cudnn', 'n/a')}), {info.get('date', '?')}",
        f"command: `{command}`; planner memory target {target_gb if target_gb is None else f'{target_gb:.1f}'} GiB",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    body = ["| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in COLUMNS) + " |" for r in rows]
    return "\n".join(head + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.data is None:
        args.data = str(CARRIED_DATA if CARRIED_DATA.is_dir() else SHARED_DATA)
    if args.part is not None:  # a child: run one part, write its result
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s [{args.part}] %(name)s: %(message)s")
        result = run_part(args)
        path = Path(args.scratch) / f"{args.part}.result.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_clean(result), indent=1, default=str))
        tmp.replace(path)
        return 0

    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _stop)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    base = list(argv)
    try:
        info, status = _child(base, "info", scratch, part_box("info", [], args.time_limit, args.dry_run), [])
        info = info.get("info", {})
        if status != "ok":
            print(f"bench_gpu: the info part failed ({status})", file=sys.stderr)
            return 2
        target = args.gpu_memory_gb or (2.0 if args.dry_run else math.floor(info["memory_gb"] * 10) / 10)
        extra = ["--gpu-memory-gb", f"{target:g}", "--data", args.data]
        rows: list[dict[str, Any]] = []
        parts = [p for p in PARTS[1:] if p in args.parts]
        for i, part in enumerate(parts):
            remaining = args.time_limit - (time.perf_counter() - started)
            box = part_box(part, parts[i + 1 :], remaining, args.dry_run)
            print(f"bench_gpu: {part} (time box {box:.0f} s)", flush=True)
            result, status = _child(base, part, scratch, box, extra)
            rows += result.get("rows", [])
            if status != "ok":
                rows.append({"part": part, "row": "(part)", "status": status})
        info["seconds"] = round(time.perf_counter() - started, 1)
        command = "python scripts/bench_gpu.py " + " ".join(argv)
        table = render_table(info, rows, command.strip(), target)
        print(table)
        (out / "gpu_check.md").write_text(table + f"\ntotal {info['seconds']:.0f} s\n")
        report = {"info": info, "gpu_memory_gb": target, "command": command.strip(), "rows": rows}
        (out / "gpu_check.json").write_text(json.dumps(_clean(report), indent=1, default=str) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
