"""Does ``medseg train --time-budget M`` keep its promise on every dataset? Wall time of the whole command.

For each dataset: copy it into a temporary folder (the shared data is read-only), ``medseg plan DATA -o WORK
--device cpu`` *without* a time budget (so the plan is GPU-sized, as a user who plans first would have it),
then ``medseg train WORK --fold F --time-budget M --device cpu`` in a fresh process: the run has to refit the
plan to the budget, train, checkpoint and validate inside ``M`` minutes. ``F`` is 0, or ``all`` for a
dataset with fewer than 5 cases (no held-out cases, so no final validation). The wall time is measured
around the process, so it includes starting Python and importing torch.

    python scripts/bench_budget_promise.py                    # every dataset, 4 minutes each (~30 min)
    python scripts/bench_budget_promise.py --datasets tumour hippocampus --minutes 3
    python scripts/bench_budget_promise.py --report ROOT      # re-print the table of an earlier run in ROOT

Datasets: the shared ones in ``../shared/data`` (``hippocampus``, ``totalseg_ct``, ``totalseg_mr``,
``voxelmorph_brain``) and ``tumour``, a generated brain-tumour-like set of 6 cases of 155x240x240 at 1 mm
with 4 channels and 5 classes (:func:`medseg.io.synthetic_kinds.generate_tumour_dataset` where that module
exists, else the basic synthetic set of :mod:`medseg.io.synthetic` at that size); ``tumour_keep`` trains
the same set with ``--keep-plan``, i.e. the GPU-sized plan of the issue itself. The table gives per
dataset the plan before and after the refit, the fit's seconds, the iterations, the final validation (its
seconds, the cases validated and the TTA passes), the wall time of the train command and whether it is
within ``M`` minutes + 5%.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = ("hippocampus", "totalseg_ct", "totalseg_mr", "voxelmorph_brain", "tumour", "tumour_keep")
TOLERANCE = 0.05
MIN_CASES_FOR_FOLDS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--minutes", type=float, default=4.0, help="time budget of every train command (default 4)")
    p.add_argument("--root", default=None, help="folder for the copies, work folders and logs (default: a temp dir)")
    p.add_argument("--report", default=None, metavar="ROOT", help="only print the table of an earlier run in ROOT")
    return p.parse_args(argv)


def make_tumour(dst: Path) -> Path:
    """6 brain-tumour-like cases, 155x240x240 at 1 mm."""
    try:
        from medseg.io.synthetic_kinds import generate_tumour_dataset
    except ImportError:
        from medseg.io.synthetic import generate_synthetic_dataset

        return generate_synthetic_dataset(dst, num_cases=6, seed=0, shape=(155, 240, 240), spacing=(1.0, 1.0, 1.0))
    return generate_tumour_dataset(dst, num_cases=6, seed=0)


def prepare(name: str, root: Path) -> Path:
    if name == "tumour_keep" and (root / "data" / "tumour" / "dataset.json").is_file():
        return root / "data" / "tumour"
    dst = root / "data" / name
    if dst.exists():
        shutil.rmtree(dst)
    if name.startswith("tumour"):
        return make_tumour(dst)
    shutil.copytree(SHARED / name, dst)
    return dst


def run_cli(args: list[str], log: Path) -> tuple[int, float]:
    """``python -m medseg ARGS`` in a fresh process; ``(exit status, wall seconds)``; output appended to ``log``."""
    t = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ medseg {' '.join(args)}\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-m", "medseg", *args], stdout=f, stderr=subprocess.STDOUT)
    return rc, time.perf_counter() - t


def bench(name: str, root: Path, minutes: float) -> dict:
    from medseg.io.dataset import load_dataset

    data = prepare(name, root)
    cases = len(load_dataset(data).cases)
    work = root / "work" / name
    if work.exists():
        shutil.rmtree(work)
    log = root / f"{name}.log"
    rc, plan_s = run_cli(["plan", str(data), "-o", str(work), "--device", "cpu", "--configs", "3d_fullres"], log)
    row = {"dataset": name, "cases": cases, "minutes": minutes, "plan_s": round(plan_s, 1), "plan_rc": rc}
    if rc != 0:
        return row
    fold = "0" if cases >= MIN_CASES_FOR_FOLDS else "all"
    keep = ["--keep-plan"] if name.endswith("_keep") else []
    rc, wall = run_cli(
        ["train", str(work), "--fold", fold, "--time-budget", f"{minutes:g}", "--device", "cpu", *keep], log
    )
    row.update(fold=fold, train_rc=rc, wall_s=round(wall, 1))
    (root / f"{name}.json").write_text(json.dumps(row, indent=1))
    return row


def describe(root: Path, row: dict) -> dict:
    """The row with what the run folder says: refit, iterations, final validation."""
    from medseg.io.workdir import WorkDir

    run = WorkDir(root / "work" / row["dataset"]).run("3d_fullres", "unet", row.get("fold", "0"))
    out = dict(row)
    cfg_path, progress_path = run.config, run.progress
    record_path = run.run_record  # older runs kept budget_fit in config.json
    if cfg_path.is_file():
        fit = json.loads((record_path if record_path.is_file() else cfg_path).read_text()).get("budget_fit") or {}

        def label(d: dict) -> str:
            return f"{d['base_features']}f {'x'.join(map(str, d['patch_size']))} b{d['batch_size']} {d['precision']}"

        if fit.get("refit"):
            out["network"] = f"{label(fit['from'])} -> {label(fit['to'])}"
            out["fit_s"] = fit["fit_seconds"]
        elif fit:
            out["network"] = f"kept {label(fit['network'])}"
    if progress_path.is_file():
        progress = json.loads(progress_path.read_text())
        out["iterations"] = progress.get("iteration")
        out["status"] = progress.get("status")
    metrics_path = run.validation_metrics
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        tb = m.get("time_budget") or {}
        held_out = len(tb.get("tta_passes", {})) + len(tb.get("skipped_cases", {})) or m.get("num_cases")
        passes = sorted(set((tb.get("tta_passes") or {}).values()))
        out["validation"] = f"{m.get('validation_seconds', 0):.0f} s, {m.get('num_cases')}/{held_out} cases" + (
            f", TTA {'/'.join(map(str, passes))} of {tb.get('full_tta_passes')}" if passes else ""
        )
    elif row.get("fold") == "all":
        out["validation"] = "none (fold all)"
    limit = row["minutes"] * 60 * (1 + TOLERANCE)
    out["within"] = "yes" if row.get("train_rc") == 0 and row.get("wall_s", 1e9) <= limit else "NO"
    return out


def print_table(rows: list[dict]) -> None:
    print(
        "\n| dataset | cases | fold | budget | network (plan -> run) | fit | iterations | final validation "
        "| train wall | within +5% |"
    )
    print("| --- | ---: | --- | ---: | --- | ---: | ---: | --- | ---: | --- |")
    for r in rows:
        fit = f"{r['fit_s']:.1f} s" if "fit_s" in r else "-"
        wall = f"{r['wall_s']:.1f} s" if "wall_s" in r else f"plan exited {r.get('plan_rc')}"
        print(
            f"| {r['dataset']} | {r['cases']} | {r.get('fold', '-')} | {r['minutes']:g} min "
            f"| {r.get('network', '-')} | {fit} | {r.get('iterations', '-')} | {r.get('validation', '-')} "
            f"| {wall} | {r['within']} |"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        root = Path(args.report)
        rows = [json.loads(p.read_text()) for p in sorted(root.glob("*.json"))]
        print_table([describe(root, r) for r in rows])
        return 0
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench_budget_promise_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"working in {root}", flush=True)
    rows = []
    for name in args.datasets:
        print(f"[{name}] plan, then train --time-budget {args.minutes:g}", flush=True)
        row = describe(root, bench(name, root, args.minutes))
        print(f"[{name}] {row}", flush=True)
        rows.append(row)
    print_table(rows)
    return 0 if all(r["within"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
