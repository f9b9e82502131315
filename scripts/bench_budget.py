"""Which plan does a time budget get on this machine? Print the candidate chosen for 10, 30 and 60 minutes.

For each budget, :func:`medseg.planning.budget.fit_plan_to_budget` measures the candidate networks on the
device (a few real training steps each) and picks the one that learns most in the budget. The
measurements are shared between the budgets (each setting is timed once, the largest budget first), so
the table shows how the same step times lead to different choices. Then every measured setting is
listed with its step time.

    python scripts/bench_budget.py                          # ../shared/data/hippocampus, cpu, 10/30/60 min (~2 h)
    python scripts/bench_budget.py DATA --budgets 10 30 --steps 3
    python scripts/bench_budget.py --plan-only              # only the plan table (about a minute)
    python scripts/bench_budget.py --plan WORK/plans.json --plan-only   # an existing plan, no planning
    python scripts/bench_budget.py --work WORK --report     # re-print the training table of an earlier run

Unless ``--plan-only`` is given, the dataset is preprocessed once, then per budget the work folder is
copied, the budget plan written into it and ``medseg train WORK --fold 0 --time-budget M`` run through the
CLI; the last table gives per budget the plan, the iterations planned and done, the wall time and the
fold-0 validation Dice (``runs/<config>/<arch>/fold_0/validation/metrics.json``). The budgets run one after
another, so the whole benchmark takes their sum plus a few minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from medseg.io.workdir import WorkDir
from medseg.planning.budget import fit_plan_to_budget
from medseg.planning.plan import NetworkPlan, Plan
from medseg.planning.step_timing import measure_step_time

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=str(DEFAULT_DATA), help=f"dataset folder (default {DEFAULT_DATA})")
    p.add_argument("--plan", default=None, help="existing plans.json to fit instead of planning DATA")
    p.add_argument("--budgets", nargs="+", type=float, default=[10.0, 30.0, 60.0], help="minutes")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--config", default=None, help="configuration to fit (default: the plan's default)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median used)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--work", default=None, help="work folder for planning/training (default: a temp folder)")
    p.add_argument(
        "--report",
        action="store_true",
        help="only print the training table of an earlier run in --work (nothing is planned or trained)",
    )
    p.add_argument(
        "--plan-only",
        action="store_true",
        help="only fit the plans; skip training fold 0 per budget (which takes the budgets' sum)",
    )
    return p.parse_args(argv)


class CachedMeasure:
    """``measure_fn`` for :func:`fit_plan_to_budget` answering from the step times an earlier fit recorded.

    The first (largest) budget is fitted with the real, interleaved measurement that ``medseg plan`` uses;
    its ``notes["budget"]`` table then answers the smaller budgets, which measure a subset of the same
    settings. A setting missing from the table is measured with :func:`measure_step_time`.
    """

    def __init__(self) -> None:
        self.table: dict[str, float] = {}
        self.extra = 0

    @staticmethod
    def key(features: int, max_features: int, patch, batch: int, precision: str, channels_last: bool) -> str:
        return json.dumps([features, max_features, list(patch), batch, precision, bool(channels_last)])

    def add_notes(self, notes: dict) -> None:
        on = notes["levers"]["measured_on"]
        for r in notes["levers"]["results"]:
            self.table[
                self.key(
                    on["base_features"],
                    on["max_features"],
                    on["patch_size"],
                    on["batch_size"],
                    r["precision"],
                    r["channels_last"],
                )
            ] = r["step_time_s"] or math.inf
        for r in notes["candidates"]:
            if r["step_time_s"] is not None:
                self.table[
                    self.key(
                        r["base_features"],
                        r["max_features"],
                        r["patch_size"],
                        r["batch_size"],
                        r["precision"],
                        r["channels_last"],
                    )
                ] = r["step_time_s"]

    def __call__(
        self, net: NetworkPlan, cin: int, k: int, device: str, precision: str, channels_last: bool, steps: int
    ) -> float:
        key = self.key(
            net.spec.base_features, net.spec.max_features, net.patch_size, net.batch_size, precision, channels_last
        )
        if key not in self.table:
            self.extra += 1
            self.table[key] = measure_step_time(net, cin, k, device, precision, channels_last, steps)
        return self.table[key]


def get_plan(args: argparse.Namespace, work: Path, preprocess: bool) -> tuple[Plan, Path]:
    from medseg.pipeline import plan_and_preprocess
    from medseg.planning.planner import PlannerOptions

    if args.plan:
        return Plan.load(args.plan), Path(args.plan).parent
    t0 = time.perf_counter()
    res = plan_and_preprocess(
        args.data,
        work,
        PlannerOptions(device=args.device),
        preprocess=preprocess,
        configs=[args.config] if args.config else None,
    )
    print(f"planned {args.data} in {time.perf_counter() - t0:.0f} s -> {res.plan_path}")
    return res.plan, work


def print_choices(results: list[tuple[float, Plan]]) -> None:
    header = (
        f"{'budget':>7s} {'feat':>4s} {'max':>4s} {'patch':>10s} {'B':>2s} {'prec':5s} {'CL':3s} "
        f"{'step s':>7s} {'iters':>6s} {'samples':>7s} {'conv':4s} {'fit s':>9s}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for minutes, plan in results:
        b = plan.notes["budget"]
        c = b["chosen"]
        print(
            f"{minutes:5g} m {c['base_features']:4d} {c['max_features']:4d} {'x'.join(map(str, c['patch_size'])):>10s} "
            f"{c['batch_size']:2d} {c['precision']:5s} {'on' if c['channels_last'] else 'off':3s} "
            f"{c['step_time_s']:7.3f} {c['iterations']:6d} {c['samples']:7d} {'yes' if c['converges'] else 'no':4s} "
            f"{b['measure_seconds']:9.1f}"
        )
    for minutes, plan in results:
        print(f"\n[{minutes:g} min] {plan.notes['budget']['reasoning']}")


def print_measurements(plan: Plan) -> None:
    """Every setting the (largest-budget) fit measured: the levers, then the candidates."""
    notes = plan.notes["budget"]
    header = f"{'feat':>4s} {'patch':>10s} {'B':>2s} {'prec':5s} {'CL':3s} {'step s':>7s} {'samples/s':>9s}  status"
    print(
        f"\nmeasured settings ({notes['measure_steps']} timed steps each, median; "
        f"{notes['torch_threads']} threads, {notes['cpu_capability']})\n" + header + "\n" + "-" * len(header)
    )
    on = notes["levers"]["measured_on"]
    rows = [({**on, **r}, "lever") for r in notes["levers"]["results"]]
    rows += [(r, r["status"]) for r in notes["candidates"] if not r["status"].startswith("measured (lever")]
    for r, status in rows:
        t = r["step_time_s"]
        sps = f"{r['batch_size'] / t:9.2f}" if t else f"{'-':>9s}"
        ts = f"{t:7.3f}" if t else f"{'-':>7s}"
        print(
            f"{r['base_features']:4d} {'x'.join(map(str, r['patch_size'])):>10s} {r['batch_size']:2d} "
            f"{r['precision']:5s} {'on' if r['channels_last'] else 'off':3s} {ts} {sps}  {status[:100]}"
        )


def train_and_report(base: Path, results: list[tuple[float, Plan]], device: str) -> None:
    """Train fold 0 with each budget's plan through the real CLI; print plan, iterations and validation Dice."""
    from medseg.cli.main import main as cli_main

    print("\nfold-0 training per budget", flush=True)
    rows = []
    for minutes, plan in sorted(results, key=lambda r: r[0]):
        work = budget_folder(base, minutes)
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(base, work, ignore=shutil.ignore_patterns(WorkDir(base).runs_root.name))
        plan.save(WorkDir(work).plans)
        cfg = plan.default_configuration
        arch = plan.configuration(cfg).default_arch
        t0 = time.perf_counter()
        rc = cli_main(
            [
                "train",
                str(work),
                "--config",
                cfg,
                "--arch",
                arch,
                "--fold",
                "0",
                "--time-budget",
                f"{minutes:g}",
                "--device",
                device,
            ]
        )
        wall = time.perf_counter() - t0
        rows.append(report_row(minutes, plan, work, rc, wall))
        print(f"[{minutes:g} min] {rows[-1][-1]} (run folder {work})", flush=True)
    print_report(rows)


def report_row(minutes: float, plan: Plan, work: Path, rc: int = 0, wall: float | None = None) -> tuple:
    """(budget, plan setting, iterations planned, iterations done, wall seconds, Dice) of one budget's run."""
    cfg = plan.default_configuration
    run = WorkDir(work).run(cfg, plan.configuration(cfg).default_arch, 0)
    metrics, progress = run.validation_metrics, run.progress
    c = plan.notes["budget"]["chosen"]
    setting = (
        f"{c['base_features']}f {'x'.join(map(str, c['patch_size']))} b{c['batch_size']} "
        f"{c['precision']}{' CL' if c['channels_last'] else ''}"
    )
    prog = json.loads(progress.read_text()) if progress.is_file() else {}
    if wall is None:  # re-reported run: the trainer's own elapsed time (includes the final validation)
        wall = prog.get("elapsed_seconds")
    if rc != 0 or not metrics.is_file():
        why = f"training exited {rc}" if rc else f"run {prog.get('status', 'not started')}"
        return minutes, setting, c["iterations"], prog.get("iteration"), wall, f"{why}; no {metrics}"
    return minutes, setting, c["iterations"], prog.get("iteration"), wall, dice_summary(json.loads(metrics.read_text()))


def print_report(rows: list[tuple]) -> None:
    header = f"{'budget':>7s}  {'plan':<28s} {'planned':>7s} {'done':>6s} {'wall':>7s}  fold-0 validation Dice"
    print("\n" + header + "\n" + "-" * (len(header) + 20))
    for minutes, setting, planned, done, wall, dice in rows:
        wall_s = f"{wall / 60:5.1f} m" if wall is not None else f"{'-':>7s}"
        print(f"{minutes:5g} m  {setting:<28s} {planned:7d} {done if done is not None else '-':>6} {wall_s}  {dice}")


BUDGET_FOLDER_SUFFIX = "_budget_{minutes}min"


def budget_folder(base: Path, minutes: float) -> Path:
    """The work folder of one budget's training, beside the shared (preprocessed) ``base``."""
    return base.with_name(base.name + BUDGET_FOLDER_SUFFIX.format(minutes=f"{minutes:g}"))


def report_existing(work: Path) -> int:
    """Print the training table of an earlier run whose per-budget folders sit beside ``work``."""
    prefix, suffix = (work.name + BUDGET_FOLDER_SUFFIX).split("{minutes}")
    found = {float(f.name[len(prefix) : -len(suffix)]): f for f in work.parent.glob(f"{prefix}*{suffix}")}
    if not found:
        print(f"error: no {prefix}*{suffix} folders beside {work}", file=sys.stderr)
        return 2
    print_report([report_row(minutes, Plan.load(WorkDir(f).plans), f) for minutes, f in sorted(found.items())])
    return 0


def dice_summary(d: dict) -> str:
    """Per-label mean Dice of a validation report (``mean_dice`` keyed by label id, named by ``label_names``)
    or of an evaluation report (``mean.<label>.dice``); else the report's keys."""
    names = dict(zip(map(str, d.get("label_ids", [])), d.get("label_names", [])))
    mean_dice = d.get("mean_dice")
    if isinstance(mean_dice, dict) and mean_dice:
        return ", ".join(f"{names.get(str(k), k)}: {v:.4f}" for k, v in mean_dice.items())
    mean = d.get("mean")
    if isinstance(mean, dict):
        parts = [f"{label}: {v['dice']:.4f}" for label, v in mean.items() if isinstance(v, dict) and "dice" in v]
        if parts:
            return ", ".join(parts)
    return str(d.get("summary", sorted(d)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.train = not args.plan_only
    if args.report:
        if not args.work:
            print("error: --report needs --work, the work folder of the earlier run", file=sys.stderr)
            return 2
        return report_existing(Path(args.work))
    tmp = None
    if args.work:
        work = Path(args.work)
    else:
        tmp = tempfile.mkdtemp(prefix="bench_budget_")
        work = Path(tmp) / "work"
    try:
        plan, base = get_plan(args, work, preprocess=args.train)
        print(
            f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
            f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
        )
        cache = CachedMeasure()
        results = []
        for i, minutes in enumerate(sorted(args.budgets, reverse=True)):  # largest first: it measures the most
            print(f"fitting to {minutes:g} min", flush=True)
            fitted = fit_plan_to_budget(
                plan,
                args.device,
                minutes,
                configuration=args.config,
                measure_steps=args.steps,
                measure_fn=cache if i else None,
            )
            cache.add_notes(fitted.notes["budget"])
            results.append((minutes, fitted))
        results.sort(key=lambda r: r[0])
        print_choices(results)
        print_measurements(results[-1][1])
        if cache.extra:
            print(f"({cache.extra} setting(s) the largest budget skipped were measured for a smaller one)")
        if args.train:
            train_and_report(base, results, args.device)
    finally:
        if tmp and not args.train:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
