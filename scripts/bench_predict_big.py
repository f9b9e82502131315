"""medseg predict vs nnUNetv2_predict on big, many-class cases: seconds and peak memory, in one run.

    python scripts/bench_predict.py big [--cases totalseg voxelmorph synthetic] [--synthetic-scale 0.5]
        [--tta off on] [--plans default cpu-budget] [--threads 2] [--work DIR] [--out DIR]

(the same as ``python scripts/bench_predict_big.py ...``). Per case, each tool gets its own plan of the
case's dataset and a model whose prediction cost is what is measured (not its accuracy):

* medseg: ``medseg plan DATA -o WORK`` (``default``) and ``medseg plan DATA -o WORK --device cpu
  --time-budget 30`` (``cpu-budget``: planning only, no 30-minute training), each trained for one
  iteration (what ``medseg train WORK --fold all --epochs 1 --iters-per-epoch 1 --no-validation`` does,
  without the per-epoch pseudo Dice), then
  ``medseg predict -i IN -o OUT -m WORK --device cpu --time-budget-per-case none [--no-tta]`` (``none``: a
  budget plan would otherwise drop TTA passes to fit 9 s per case; here TTA on means all of them).
* nnU-Net v2 (its own environment, ``--nnunet-venv``): the dataset copied into nnU-Net's raw layout (label
  ids renumbered 0..K-1 where they have gaps), ``nnUNetv2_extract_fingerprint`` and
  ``nnUNetv2_plan_experiment``, a ``3d_fullres`` model folder with the network saved at initialisation
  (no training), then ``nnUNetv2_predict -i IN -o OUT -d ID -c 3d_fullres -f 0 -device cpu -npp W -nps W
  [--disable_tta]``.

Cases: ``totalseg`` (shared ``totalseg_ct``, 118 ids; predicts ``example_ct``), ``voxelmorph`` (shared
``voxelmorph_brain``, 46 ids), ``synthetic`` (a CT-like ``512 x 512 x 400`` volume of
``bench_predict_memory.py`` times ``--synthetic-scale`` per axis, 0.8 x 0.8 x 1.5 mm, with a 118-id label
map so both tools can plan it). The rows of a case are interleaved (medseg default, nnU-Net, medseg
cpu-budget; TTA off, then on) so the tools see the same machine load. Both run with ``--threads`` OpenMP /
MKL threads. Each prediction is one CLI process timed end to end (wall seconds, and CPU seconds of its
whole process tree), with the process tree sampled every 0.2 s for the sum of RSS, the sum of PSS (shared
pages split fairly) and the number of processes (nnU-Net's preprocessing and export workers count). A run
whose tree passes ``--max-tree-gb`` or ``--run-timeout`` is stopped and reported as such.
Setup (plans, models) is kept in ``--work`` and reused by a rerun; rows are written to
``OUT/bench_predict_big.json`` and ``.md`` as they land.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict_big_setup import CaseSetup, tool_env  # noqa: E402
from compare_nnunet import _atomic_write_text  # noqa: E402

CASES = ("totalseg", "voxelmorph", "synthetic")
PLANS = ("default", "cpu-budget")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the benchmark (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--plans", nargs="+", choices=PLANS, default=list(PLANS), help="medseg plans to predict with")
    p.add_argument("--tta", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--synthetic-scale", type=float, default=0.5, help="shape 512x512x400 times this per axis")
    p.add_argument("--synthetic-classes", type=int, default=118)
    p.add_argument("--budget-minutes", type=float, default=30.0, help="the cpu-budget plan's --time-budget")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of both tools")
    p.add_argument("--workers", type=int, default=2, help="medseg --num-workers, nnU-Net -npp and -nps")
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds before a prediction is stopped")
    p.add_argument("--max-tree-gb", type=float, default=16.0, help="stop a prediction whose tree RSS passes this")
    p.add_argument("--skip-nnunet", action="store_true")
    p.add_argument("--setup-only", action="store_true", help="write the plans and models, measure nothing")
    p.add_argument("--nnunet-venv", type=Path, default=Path("/work/nnunet_venv"))
    p.add_argument("--work", type=Path, default=None, help="keep plans and models here (reused by a rerun)")
    p.add_argument("--out", type=Path, default=Path("bench_predict_big"))
    args = p.parse_args(argv)
    if not 0 < args.synthetic_scale <= 1:
        p.error(f"--synthetic-scale must be in (0, 1], got {args.synthetic_scale}")
    if args.synthetic_classes < 2:
        p.error("--synthetic-classes must be at least 2")
    if args.threads < 1 or args.workers < 1:
        p.error("--threads and --workers must be at least 1")
    return args


# ----------------------------------------------------------------------------------------- process tree


@dataclass
class TreePeak:
    """Peaks over the samples of one process tree (bytes; ``processes`` counts the tree's members)."""

    rss: int = 0
    pss: int = 0
    processes: int = 0

    def update(self, rss: int, pss: int, processes: int) -> None:
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
        self.processes = max(self.processes, processes)


def tree_totals(root: int, children: dict[int, list[int]], memory: dict[int, tuple[int, int]]) -> tuple[int, int, int]:
    """Sum of RSS, sum of PSS (bytes) and member count of ``root``'s process tree.

    Args:
        root: pid of the tree's root.
        children: pid -> pids of its direct children.
        memory: pid -> (RSS, PSS) in bytes; a pid missing here (it exited between reads) counts 0 bytes
            but is still a member.

    Returns:
        (RSS bytes, PSS bytes, processes); each pid counts once even if listed twice.
    """
    rss = pss = 0
    seen: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        r, s = memory.get(pid, (0, 0))
        rss, pss = rss + r, pss + s
        todo.extend(children.get(pid, []))
    return rss, pss, len(seen)


def _read_kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _sample_tree(root: int) -> tuple[int, int, int]:
    """(RSS, PSS, processes) of ``root``'s live tree, from ``/proc``."""
    children: dict[int, list[int]] = {}
    memory: dict[int, tuple[int, int]] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in memory:
            continue
        memory[pid] = (_read_kb(f"/proc/{pid}/status", "VmRSS:"), _read_kb(f"/proc/{pid}/smaps_rollup", "Pss:"))
        try:
            kids = [
                int(c) for t in os.scandir(f"/proc/{pid}/task") for c in Path(t.path, "children").read_text().split()
            ]
        except (OSError, ValueError):
            kids = []
        children[pid] = kids
        todo += kids
    return tree_totals(root, children, memory)


@dataclass
class Measured:
    """One measured command: wall and tree CPU seconds, peaks, exit status, and why it stopped if it did."""

    seconds: float
    cpu_seconds: float
    peak: TreePeak
    returncode: int
    stopped: str | None = None


def run_measured(cmd: list[str], env: dict[str, str], log: Path, timeout: float, max_tree_bytes: float) -> Measured:
    """Run ``cmd`` in its own session, sampling its process tree every 0.2 s; output goes to ``log``.

    CPU seconds are user + system time of the whole tree (``RUSAGE_CHILDREN`` before/after; workers
    reaped by their parent included). The run is stopped (SIGTERM to its process group, then SIGKILL)
    past ``timeout`` seconds or when the tree's summed RSS passes ``max_tree_bytes``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak, stopped = TreePeak(), None
    t0 = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while proc.poll() is None:
            peak.update(*_sample_tree(proc.pid))
            if stopped is None and peak.rss > max_tree_bytes:
                stopped = f"stopped: tree RSS over {max_tree_bytes / 1e9:g} GB"
            elif stopped is None and time.perf_counter() - t0 > timeout:
                stopped = f"stopped: over {timeout:.0f} s"
            if stopped:
                _stop(proc)
                break
            time.sleep(0.2)
        rc = proc.wait()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return Measured(time.perf_counter() - t0, cpu, peak, rc, stopped)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------- table


def ratio_rows(rows: list[dict]) -> list[dict]:
    """Each medseg row with ``ratio_*`` = medseg / nnU-Net (same case and TTA; None without an nnU-Net row).

    Ratios of wall seconds, tree CPU seconds and peak tree RSS and PSS; a stopped or failed run on
    either side gives no ratio.
    """
    ok = {(r["case"], r["tta"]): r for r in rows if r["tool"] == "nnU-Net" and r["status"] == "ok"}
    out = []
    for r in rows:
        r = dict(r)
        nn = ok.get((r["case"], r["tta"])) if r["tool"] != "nnU-Net" and r["status"] == "ok" else None
        for key in ("seconds", "cpu_seconds", "rss_gb", "pss_gb"):
            r[f"ratio_{key}"] = r[key] / nn[key] if nn and nn[key] else None
        out.append(r)
    return out


def render_markdown(rows: list[dict]) -> str:
    """The results table (Markdown): one line per prediction, medseg/nnU-Net ratios on medseg's lines."""

    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        "| case | TTA | tool (plan) | network | status | wall s | CPU s | peak RSS GB | peak PSS GB "
        "| processes | load | medseg/nnU-Net wall | CPU | RSS |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in ratio_rows(rows):
        tool = r["tool"] if r["tool"] == "nnU-Net" else f"medseg ({r['tool']})"
        lines.append(
            f"| {r['case']} | {r['tta']} | {tool} | {r['network']} | {r['status']} | {r['seconds']:.1f} "
            f"| {r['cpu_seconds']:.1f} | {r['rss_gb']:.2f} | {r['pss_gb']:.2f} | {r['processes']} | {r.get('load_1min', '-')} "
            f"| {ratio(r['ratio_seconds'])} | {ratio(r['ratio_cpu_seconds'])} | {ratio(r['ratio_rss_gb'])} |"
        )
    return "\n".join(lines) + "\n"


def row_of(case: str, tta: str, tool: str, network: str, m: Measured, outputs: int) -> dict:
    """A table row from one measured prediction (``status`` ok only with exit 0 and an output written)."""
    status = m.stopped or ("ok" if m.returncode == 0 and outputs else f"failed ({m.returncode})")
    return {
        "case": case,
        "tta": tta,
        "tool": tool,
        "network": network,
        "status": status,
        "seconds": round(m.seconds, 1),
        "cpu_seconds": round(m.cpu_seconds, 1),
        "rss_gb": round(m.peak.rss / 1e9, 3),
        "pss_gb": round(m.peak.pss / 1e9, 3),
        "processes": m.peak.processes,
    }


def previous_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's ``bench_predict_big.json`` (none when it is missing or unreadable)."""
    try:
        return list(json.loads(path.read_text())["rows"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return []


def merge_row(rows: list[dict], row: dict) -> list[dict]:
    """``rows`` with ``row`` replacing the row of the same case, TTA and tool (appended when there is none)."""
    key = (row["case"], row["tta"], row["tool"])
    for i, r in enumerate(rows):
        if (r["case"], r["tta"], r["tool"]) == key:
            return [*rows[:i], row, *rows[i + 1 :]]
    return [*rows, row]


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Set up every case (reusing ``--work``), then measure its predictions; returns 0."""
    args = parse_args(argv)
    tmp = None
    if args.work is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_predict_big_"))
    work = args.work or tmp
    assert work is not None
    rows = previous_rows(args.out / "bench_predict_big.json")
    meta = {
        "argv": sys.argv[1:] if argv is None else argv,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        for case in args.cases:
            setup = CaseSetup(case, work / case, args)
            setup.prepare()
            for tta in [] if args.setup_only else args.tta:
                for tool in [args.plans[0], "nnU-Net", *args.plans[1:]]:
                    if tool == "nnU-Net" and (args.skip_nnunet or setup.nnunet_model is None):
                        continue
                    cmd, env, out = setup.predict_command(tool, tta == "on")
                    shutil.rmtree(out, ignore_errors=True)
                    load = os.getloadavg()[0]
                    m = run_measured(
                        cmd,
                        tool_env(env, args.threads),
                        out.with_suffix(".log"),
                        args.run_timeout,
                        args.max_tree_gb * 1e9,
                    )
                    written = len(list(out.glob("*.nii.gz"))) if out.is_dir() else 0
                    row = row_of(case, tta, tool, setup.network(tool), m, written)
                    row["load_1min"] = round(load, 1)
                    rows = merge_row(rows, row)
                    print(json.dumps(row), flush=True)
                    _atomic_write_text(
                        args.out / "bench_predict_big.json", json.dumps({**meta, "rows": rows}, indent=1)
                    )
                    _atomic_write_text(args.out / "bench_predict_big.md", render_markdown(rows))
        print("\n" + render_markdown(rows))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
