"""The README's CPU path under a time budget, scored on held-out cases, per lever and seed, in one run.

Usage::

    .venv/bin/python scripts/bench_cpu_budget.py ../shared/data/hippocampus --minutes 30 --test-cases 20 \\
        --isa avx2 --seeds 0 1 --variant baseline= --variant ema=--weight-averaging=ema --out results

    # Lookahead and a 3-snapshot ensemble (issue 37): the snapshots are predicted as 3 members of fold 0
    ... --variant baseline= --variant la=--optimizer=lookahead-adamw --variant snap=--snapshots=3 \
        --predict-args snap=--checkpoint=snapshots

For every ``--variant NAME=TRAIN_ARGS`` and every seed, in order: ``medseg plan TRAIN -o WORK --device cpu
--time-budget M``, ``medseg train WORK --fold 0 --seed S TRAIN_ARGS`` (the README's command: the plan's
budget, final validation on the fold-0 held-out cases), ``medseg predict -i TEST -o PRED -m WORK`` (plus the
variant's ``--predict-args``; its time is the table's ``predict s``), then
Dice per class on the test cases with the metric code of ``scripts/compare_nnunet.py`` (independent of
medseg). The split is that script's: ``--test-cases`` ids drawn with a fixed seed never reach medseg.

``--isa avx2`` runs every medseg command with oneDNN, ATen and MKL limited to AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``): on an AMX Xeon this
is the code path of an AVX2-only CPU (no native bf16, so the planner keeps fp32), not its speed.

Prints one table (variant, seed, plan, measured step, iterations, fold-0 validation Dice, test Dice) and
writes ``bench_cpu_budget.json`` / ``.md`` into ``--out`` (atomically). Run nothing else on the machine
meanwhile: every number here is wall-clock bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_nnunet import (  # noqa: E402
    _atomic_write_text,
    _default_medseg_bin,
    evaluate_folder,
    nnunet_label_ids,
    read_source_dataset,
    run_stage,
    split_cases,
    write_nnunet_raw,
    write_test_split,
)

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _run_facts(work: Path) -> dict:
    """Plan chosen, step time, iterations and fold-0 validation Dice of the run in ``work``."""
    from medseg.io.workdir import WorkDir

    facts: dict = {}
    wd = WorkDir(work)
    runs = sorted(
        (r for r in (wd.run(c, a, 0) for c, a in wd.run_pairs()) if r.path.is_dir()),
        key=lambda r: r.path.stat().st_mtime,
    )
    if not runs:
        return facts
    run = runs[-1]
    plan = _read_json(run.plans) or _read_json(wd.plans)
    cfg_name = run.configuration
    try:
        net = plan["configurations"][cfg_name]["networks"][run.arch]
        facts["network"] = (
            f"{net['spec']['base_features']}f {'x'.join(map(str, net['patch_size']))} "
            f"b{net['batch_size']} {net['precision']}"
        )
    except (KeyError, TypeError):
        pass
    chosen = plan.get("notes", {}).get("budget", {}).get("chosen", {}) if isinstance(plan, dict) else {}
    if isinstance(chosen, dict):
        facts["fit_step_s"] = chosen.get("step_time_s")
        facts["channels_last"] = chosen.get("channels_last")
    progress = _read_json(run.progress)
    facts["iterations"] = progress.get("iteration")
    facts["train_loop_s"] = progress.get("elapsed_seconds")
    metrics = _read_json(run.validation_metrics)
    names = {str(i): n for n, i in zip(metrics.get("label_names", []), metrics.get("label_ids", []))}
    if isinstance(metrics.get("mean_dice"), dict):
        facts["val_dice"] = {names.get(str(k), str(k)): v for k, v in metrics["mean_dice"].items()}
        facts["val_cases"] = metrics.get("num_cases")
    facts["config"] = _read_json(run.config)
    return facts


def _edit_network_options(plans_json: Path, options: dict) -> None:
    """Merge ``options`` into the default network of the default configuration (the budget fit stays)."""
    plan = json.loads(plans_json.read_text())
    cfg = plan["configurations"][plan["default_configuration"]]
    spec = cfg["networks"][cfg["default_arch"]]["spec"]
    spec["options"] = {**spec.get("options", {}), **options}
    _atomic_write_text(plans_json, json.dumps(plan, indent=2))


def _fmt(v, f="{:.4f}") -> str:
    return "-" if v is None else (f.format(v) if isinstance(v, float) else str(v))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--test-cases", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        help="NAME=extra `medseg train` arguments (repeatable; default: baseline=)",
    )
    p.add_argument(
        "--predict-args",
        action="append",
        default=[],
        help="NAME=extra `medseg predict` arguments of variant NAME, e.g. snap=--checkpoint=snapshots "
        "(with --variant snap=--snapshots=3: a snapshot ensemble)",
    )
    p.add_argument(
        "--net-options",
        action="append",
        default=[],
        help="NAME=JSON: merged into the network options of variant NAME after planning, e.g. "
        'narrow={"full_res_features": 8}',
    )
    p.add_argument("--isa", choices=("native", "avx2"), default="native")
    p.add_argument("--workdir", type=Path, default=Path("bench_cpu_budget_work"))
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--medseg-bin", default=_default_medseg_bin())
    args = p.parse_args(argv)

    variants = []
    for v in args.variant or ["baseline="]:
        name, _, extra = v.partition("=")
        variants.append((name, shlex.split(extra)))
    predict_args = {}
    for v in args.predict_args:
        name, _, extra = v.partition("=")
        predict_args[name] = shlex.split(extra)
    net_options = {}
    for v in args.net_options:
        name, _, text = v.partition("=")
        net_options[name] = json.loads(text)
    env = dict(os.environ)
    if args.isa == "avx2":
        env.update(AVX2_ENV)
    ds = read_source_dataset(args.data)
    train_ids, test_ids = split_cases(ds.case_ids, args.test_cases)
    root = args.workdir
    raw = write_nnunet_raw(ds, train_ids, root / "data")
    test_images, reference = root / "test_images", root / "reference"
    write_test_split(ds, test_ids, test_images, reference)
    lut = nnunet_label_ids(ds.labels)
    labels = {n: lut[i] for n, i in ds.labels.items()}
    fg = [n for n, i in labels.items() if i != 0]
    m = f"{args.minutes:g}"
    rows = []
    for name, extra in variants:
        for seed in args.seeds:
            tag = f"{name}_seed{seed}"
            work, pred, logs = root / tag / "work", root / tag / "pred", root / tag / "logs"
            row: dict = {"variant": name, "seed": seed, "train_args": extra, "predict_args": predict_args.get(name, [])}
            stages = [
                ("plan", [args.medseg_bin, "plan", str(raw), "-o", str(work), "--device", "cpu", "--time-budget", m]),
                ("train", [args.medseg_bin, "train", str(work), "--fold", "0", "--seed", str(seed), *extra]),
                (
                    "predict",
                    [
                        args.medseg_bin,
                        "predict",
                        "-i",
                        str(test_images),
                        "-o",
                        str(pred),
                        "-m",
                        str(work),
                        "--folds",
                        "0",
                        *predict_args.get(name, []),
                    ],
                ),
            ]
            for stage, cmd in stages:
                if stage == "train" and name in net_options:
                    _edit_network_options(work / "plans.json", net_options[name])
                    row["net_options"] = net_options[name]
                print(f"[{time.strftime('%H:%M:%S')}] {tag}: {stage}", flush=True)
                res = run_stage(stage, cmd, logs / f"{stage}.log", env)
                row[f"{stage}_s"] = None if res.seconds is None else round(res.seconds, 1)
                if not res.ok:
                    row["failed"] = f"{stage}: {res.reason}"
                    break
            row.update(_run_facts(work))
            if "failed" not in row:
                ev = evaluate_folder(pred, reference, test_ids, labels)
                row["test_dice"] = dict(ev["dice"])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)

    head = (
        ["variant", "seed", "network", "fit step s", "iterations", "train s", "predict s"]
        + [f"fold-0 {n}" for n in fg]
        + [f"test {n}" for n in fg]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        val, test = r.get("val_dice", {}), r.get("test_dice", {})
        cells = [
            r["variant"],
            r["seed"],
            r.get("network", r.get("failed", "-")),
            r.get("fit_step_s"),
            r.get("iterations"),
            r.get("train_s"),
            r.get("predict_s"),
        ]
        cells += [val.get(n) for n in fg] + [test.get(n) for n in fg]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    table = "\n".join(lines)
    print(table)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, isa={args.isa}"
    args.out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(args.out / "bench_cpu_budget.md", f"{machine}, {time.strftime('%Y-%m-%d')}\n\n{table}\n")
    _atomic_write_text(
        args.out / "bench_cpu_budget.json",
        json.dumps(
            {"machine": machine, "minutes": args.minutes, "test_ids": test_ids, "rows": rows}, indent=1, default=str
        ),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
