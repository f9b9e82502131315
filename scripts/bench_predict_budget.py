"""Dice and HD95 against seconds per case: ``medseg predict`` at several per-case time budgets.

    python scripts/bench_predict_budget.py -m WORK -i IMAGES --labels LABELS \\
        [--budgets none default 9 4 2] [--device cpu] [--folds 0] [--config 3d_fullres] [--arch unet] \\
        [-o OUT] [--json results.json]

For every budget (``none`` = no limit; ``default`` = the rule ``medseg predict`` applies without
``--time-budget-per-case``: on the CPU 10% of the plan's training budget over 20 cases; a number = seconds
per case) the script builds the predictor afresh, as ``medseg predict`` does, predicts ``IMAGES`` into
``OUT/budget_<b>`` (``--time-budget-per-case`` semantics, :mod:`medseg.inference.time_budget`), and evaluates
the segmentations against ``LABELS`` (a folder of reference segmentations, or a dataset root with
``labelsTr/``) with :func:`medseg.evaluation.evaluate_folders`. Before the first budget one case is predicted
once, untimed, so that the first row does not pay the process's first forward passes alone.

Prints one markdown table: budget, where it came from, mean seconds per case (the record's sum of reading,
network and export, and the wall time over the cases), in how many cases the budget held, the TTA passes and
window overlaps used (``passes x cases``), mean foreground Dice, Dice and HD95 (mm) per label.
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
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_budget(text: str) -> float | str | None:
    """``none`` -> None (no limit), ``default`` -> ``"auto"``, else positive seconds."""
    word = text.strip().lower()
    if word == "none":
        return None
    if word in ("default", "auto"):
        return "auto"
    seconds = float(word)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"a budget must be > 0 seconds, 'none' or 'default', got {text!r}")
    return seconds


def budget_name(budget: float | str | None) -> str:
    return "none" if budget is None else "default" if budget == "auto" else f"{budget:g}"


def _predictor(args: argparse.Namespace):
    from medseg.ensembling import bundle_predictor, work_dir_predictor

    folds = None if args.folds is None else [f if f == "all" else int(f) for f in args.folds]
    model = Path(args.model)
    build = bundle_predictor if model.is_file() else work_dir_predictor
    extra = {} if model.is_file() else {"checkpoint": args.checkpoint}
    return build(
        model,
        configs=args.config,
        archs=args.arch,
        folds=folds,
        device=args.device,
        step=args.step,
        use_tta=not args.no_tta,
        postprocessing=not args.no_postprocessing,
        **extra,
    )


def _usage(records: dict[str, Any], key: str) -> str:
    counts = Counter(getattr(r, key) for r in records.values())
    return ", ".join(f"{v:g} x {n}" for v, n in sorted(counts.items(), reverse=True))


def run_budget(args: argparse.Namespace, budget: float | str | None, out: Path) -> dict[str, Any]:
    """Predict ``args.images`` at ``budget`` into ``out`` and evaluate it: one row of the table."""
    from medseg.evaluation import evaluate_folders
    from medseg.inference import predict_folder

    predictor = _predictor(args)
    start = time.perf_counter()
    res = predict_folder(
        args.images,
        out,
        predictor,
        overwrite=True,
        progress=False,
        num_workers=args.num_workers,
        time_budget_per_case=budget,
    )
    wall = time.perf_counter() - start
    if not res.written:
        raise SystemExit(f"budget {budget_name(budget)}: no case was predicted ({res.summary()})")
    report = evaluate_folders(out, args.labels, label_ids=args.label_ids, progress=False, num_workers=1)
    recs = res.records
    per_label = {lab: (v["dice"], v["hd95"]) for lab, v in report["mean"].items()}
    held = [r.held for r in recs.values() if r.held is not None]
    return {
        "budget": budget_name(budget),
        "seconds_per_case": res.time_budget,
        "rule": res.budget_rule,
        "cases": len(recs),
        "failed": len(res.failed),
        "mean_seconds": sum(r.seconds for r in recs.values()) / len(recs),
        "wall_seconds_per_case": wall / len(recs),
        "held": f"{sum(held)}/{len(held)}" if held else "-",
        "tta_passes": _usage(recs, "tta_passes"),
        "overlap": _usage(recs, "overlap"),
        "dice": report["foreground_mean"]["dice"],
        "hd95": report["foreground_mean"]["hd95"],
        "per_label": per_label,
    }


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`run_budget` as a markdown table (labels from the first row)."""
    labels = list(rows[0]["per_label"]) if rows else []
    head = [
        "budget (s/case)",
        "rule",
        "mean s/case",
        "wall s/case",
        "held",
        "TTA passes x cases",
        "overlap x cases",
        "mean Dice",
        *[f"Dice {lab}" for lab in labels],
        *[f"HD95 {lab} (mm)" for lab in labels],
    ]
    align = "|".join(" --- " if i < 2 else " ---: " for i in range(len(head)))
    lines = ["| " + " | ".join(head) + " |", f"|{align}|"]
    for r in rows:
        budget = r["budget"]
        if budget == "default" and r["seconds_per_case"] is not None:
            budget += f" ({r['seconds_per_case']:.3g})"
        cells = [
            budget,
            r["rule"],
            _num(r["mean_seconds"], ".2f"),
            _num(r["wall_seconds_per_case"], ".2f"),
            r["held"],
            r["tta_passes"],
            r["overlap"],
            _num(r["dice"], ".4f"),
            *[_num(r["per_label"].get(lab, (None, None))[0], ".4f") for lab in labels],
            *[_num(r["per_label"].get(lab, (None, None))[1], ".2f") for lab in labels],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _warm_up(args: argparse.Namespace, scratch: Path) -> None:
    """Predict the first case once, untimed (imports, first forward passes, thread pools)."""
    from medseg.inference import predict_folder
    from medseg.io.dataset import find_prediction_cases

    predictor = _predictor(args)
    cases = find_prediction_cases(Path(args.images), predictor.plan.num_channels)
    if not cases:
        return
    one = scratch / "warmup_in"
    one.mkdir(parents=True)
    for f in cases[0].image_files:
        (one / Path(f).name).symlink_to(Path(f).resolve())
    predict_folder(one, scratch / "warmup_out", predictor, overwrite=True, progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", required=True, help="work folder with trained runs, or a model bundle (.zip)")
    parser.add_argument("-i", "--images", required=True, type=Path, help="folder of test images")
    parser.add_argument("--labels", required=True, type=Path, help="reference segmentations (or a dataset root)")
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=parse_budget,
        default=[None, "auto", 9.0, 4.0, 2.0],
        help="per-case budgets: seconds, 'none' (no limit) or 'default' (default: none default 9 4 2); "
        "'none' is always run",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="folder for the predictions (default: a temporary folder, removed afterwards)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", nargs="+", default=None)
    parser.add_argument("--arch", nargs="+", default=None)
    parser.add_argument("--folds", nargs="+", default=None)
    parser.add_argument("--checkpoint", choices=["final", "best", "latest"], default="final")
    parser.add_argument("--step", type=float, default=0.5)
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--no-postprocessing", action="store_true")
    parser.add_argument("--label-ids", nargs="+", type=int, default=None, help="labels to evaluate (default: all)")
    parser.add_argument("--num-workers", type=int, default=1, help="reading/writing threads (as medseg predict)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed prediction of the first case")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    budgets: list[float | str | None] = [None]
    for b in args.budgets:
        if b not in budgets:
            budgets.append(b)
    root = args.output or Path(tempfile.mkdtemp(prefix="medseg_budget_"))
    rows = []
    try:
        if not args.no_warmup:
            _warm_up(args, root / "scratch")
        for b in budgets:
            row = run_budget(args, b, root / f"budget_{budget_name(b)}")
            print(
                f"budget {row['budget']}: {row['mean_seconds']:.2f} s/case, Dice {_num(row['dice'], '.4f')}",
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)
    finally:
        shutil.rmtree(root / "scratch", ignore_errors=True)
        if args.output is None:
            shutil.rmtree(root, ignore_errors=True)
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
