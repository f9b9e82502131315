"""Paired per-case comparison of ``medseg evaluate`` results against a base model.

    python scripts/compare_metrics.py BASE=metrics_base.json NAME=metrics.json [NAME=...] [--metric dice] [--json OUT]

Each file is the JSON ``medseg evaluate PRED REF -o FILE`` writes. A case's score is the mean of its labels'
``--metric`` (labels whose value is null, e.g. an undefined HD95, left out). For every model after the first, over
the cases both it and the base scored: the mean of the per-case differences (model minus base), their standard
error (sample standard deviation / sqrt n), the cases the model is better / worse / tied on (lower is better for
hd95) and n. The first row is the base itself. Prints a Markdown table; ``--json`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

LOWER_IS_BETTER = {"hd95"}


def case_scores(result: dict[str, Any], metric: str) -> dict[str, float]:
    """Case id -> the mean of its labels' ``metric`` (cases with no defined value left out)."""
    scores: dict[str, float] = {}
    for case in result["cases"]:
        values = [v[metric] for v in case["labels"].values() if v.get(metric) is not None]
        if values:
            scores[str(case["case"])] = sum(values) / len(values)
    return scores


def paired(base: dict[str, float], other: dict[str, float], metric: str) -> dict[str, Any]:
    """``other`` minus ``base`` over their common cases: mean, standard error, better / worse / tied, n."""
    common = sorted(set(base) & set(other))
    if not common:
        raise ValueError("no case is scored in both results")
    diffs = [other[c] - base[c] for c in common]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    return {
        "n": n,
        "mean": sum(other[c] for c in common) / n,
        "delta": mean,
        "se": se,
        "better": sum(1 for d in diffs if sign * d > 0),
        "worse": sum(1 for d in diffs if sign * d < 0),
        "tied": sum(1 for d in diffs if d == 0),
    }


def compare(results: list[tuple[str, dict[str, Any]]], metric: str) -> list[dict[str, Any]]:
    """One row per model, the first (the base) with only its mean."""
    (base_name, base_result), rest = results[0], results[1:]
    base = case_scores(base_result, metric)
    if not base:
        raise ValueError(f"{base_name}: no case has a {metric}")
    rows: list[dict[str, Any]] = [{"name": base_name, "n": len(base), "mean": sum(base.values()) / len(base)}]
    for name, result in rest:
        rows.append({"name": name, **paired(base, case_scores(result, metric), metric)})
    return rows


def render(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [
        f"| model | cases | mean {metric} | minus {rows[0]['name']} | paired SE | better / worse / tied |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        f"| {rows[0]['name']} | {rows[0]['n']} | {rows[0]['mean']:.4f} | base | | |",
    ]
    for r in rows[1:]:
        se = "-" if r["se"] is None else f"{r['se']:.4f}"
        lines.append(
            f"| {r['name']} | {r['n']} | {r['mean']:.4f} | {r['delta']:+.4f} | {se} "
            f"| {r['better']} / {r['worse']} / {r['tied']} |"
        )
    return "\n".join(lines)


def _named(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=metrics.json")
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=_named, metavar="NAME=JSON", help="the base first")
    ap.add_argument("--metric", default="dice", help="a per-label metric of the JSON (default dice)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if len(args.results) < 2:
        ap.error("give the base and at least one model to compare with it")
    loaded: list[tuple[str, dict[str, Any]]] = []
    for name, path in args.results:
        try:
            loaded.append((name, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(loaded[-1][1].get("cases"), list):
            print(f"error: {path}: not a `medseg evaluate` result (no 'cases' list)", file=sys.stderr)
            return 2
    try:
        rows = compare(loaded, args.metric)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(rows, args.metric))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
