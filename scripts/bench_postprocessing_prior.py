"""Measure the postprocessing decided from the training labels (``medseg.postprocessing.prior``) on predictions.

    python scripts/bench_postprocessing_prior.py PRED_DIR LABEL_DIR WORK_DIR [--rules RULES.json]
                                                 [--num-workers 2] [--json OUT.json]

``PRED_DIR`` holds *unpostprocessed* predictions (``medseg predict --no-postprocessing``, or a run's
``validation/`` folder), ``LABEL_DIR`` the references (e.g. ``DATA/labelsTr``), matched by file name.
The rules are ``--rules`` (e.g. ``RUN/postprocessing_prior.json``), else decided now from every case of
``WORK_DIR/fingerprint.json``. For fold-k validation predictions pass that run's recorded file: it was
decided from the fold's training cases only, so the held-out cases did not inform it.

Prints the decision and its evidence per class, then per class the mean Dice and the mean / maximum HD95
(mm; cases where exactly one mask is empty are counted as undefined, not averaged) for: no
postprocessing, the decided rules, and for comparison the same step for every class (largest component,
and removing components below each fraction of find-best's grid). Metrics are those of ``medseg
evaluate`` (:func:`medseg.evaluation.metrics.case_metrics`; Dice 1 and HD95 0 when both masks are empty).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medseg.evaluation.metrics import case_metrics
from medseg.fingerprint import Fingerprint
from medseg.io.image import has_image_suffix, read_image, strip_suffix
from medseg.io.parallel import map_cases
from medseg.postprocessing import DEFAULT_FRACTIONS, apply_postprocessing, load_rules, prior_rules
from medseg.postprocessing.prior import describe_prior


def _images(folder: Path) -> dict[str, Path]:
    return {
        strip_suffix(p.name): p
        for p in sorted(folder.iterdir())
        if p.is_file() and has_image_suffix(p.name) and not p.name.startswith(".")
    }


def _variants(rules: dict[str, Any], label_ids: list[int]) -> dict[str, dict[str, Any] | None]:
    fg = [k for k in label_ids if k != 0]
    out: dict[str, dict[str, Any] | None] = {"none": None, "decided": rules}
    out["all largest_component"] = {"per_label": {str(k): [{"op": "largest_component"}] for k in fg}}
    for f in sorted(DEFAULT_FRACTIONS, reverse=True):
        out[f"all remove_small {f:.3g}"] = {"per_label": {str(k): [{"op": "remove_small", "fraction": f}] for k in fg}}
    return out


def _case(
    item: tuple[str, Path, Path], variants: dict[str, Any], label_ids: list[int], ignore_label: int | None
) -> dict[str, Any]:
    case, pred_path, ref_path = item
    pred, geo = read_image(pred_path)
    ref, _ = read_image(ref_path)
    pred, ref = np.rint(pred).astype(np.int32), np.rint(ref).astype(np.int32)
    if pred.shape != ref.shape:
        raise SystemExit(f"{case}: prediction shape {pred.shape} != reference shape {ref.shape}")
    if ignore_label is not None:
        ignored = ref == ignore_label
        pred[ignored], ref[ignored] = 0, 0
    fg = [k for k in label_ids if k != 0]
    out: dict[str, Any] = {"case": case, "changed": {}}
    for name, rules in variants.items():
        seg = apply_postprocessing(pred, rules)
        out[name] = case_metrics(seg, ref, geo.spacing, fg)
        out["changed"][name] = bool((seg != pred).any())
    return out


def _summary(results: list[dict[str, Any]], name: str, label: int) -> dict[str, Any]:
    entries = [r[name][label] for r in results]
    hd = [e["hd95"] for e in entries if math.isfinite(e["hd95"])]
    return {
        "dice": float(np.mean([e["dice"] for e in entries])),
        "hd95_mean": float(np.mean(hd)) if hd else None,
        "hd95_max": float(np.max(hd)) if hd else None,
        "hd95_undefined": len(entries) - len(hd),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pred", type=Path, help="folder of unpostprocessed predictions")
    p.add_argument("labels", type=Path, help="folder of reference labels")
    p.add_argument("work", type=Path, help="work folder (fingerprint.json)")
    p.add_argument("--rules", type=Path, default=None, help="rules file (default: decided from the fingerprint)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the per-class summary here")
    args = p.parse_args(argv)

    fp = Fingerprint.load(args.work / "fingerprint.json")
    rules = load_rules(args.rules) if args.rules else prior_rules(fp)
    label_ids = [int(v) for v in fp.label_ids]
    print(f"decided from {rules.get('num_cases', '?')} references: {describe_prior(rules)}")
    for lab, ev in sorted((rules.get("evidence") or {}).items(), key=lambda kv: int(kv[0])):
        print(
            f"  label {lab}: {ev['single_component_cases']}/{ev['num_cases']} cases one component "
            f"(largest share min {ev['min_largest_share']}), needed ratio min {ev['needed_ratio_min']} "
            f"q05 {ev['needed_ratio_q05']} -> {ev['decision']}"
        )

    preds, refs = _images(args.pred), _images(args.labels)
    cases = sorted(set(preds) & set(refs))
    if not cases:
        print(f"no prediction in {args.pred} has a reference in {args.labels}", file=sys.stderr)
        return 2
    if len(cases) < len(preds):
        print(f"warning: {len(preds) - len(cases)} prediction(s) without a reference are skipped", file=sys.stderr)
    variants = _variants(rules, label_ids)
    results = map_cases(
        functools.partial(_case, variants=variants, label_ids=label_ids, ignore_label=fp.ignore_label),
        [(c, preds[c], refs[c]) for c in cases],
        args.num_workers,
        desc="bench",
    )
    if rules.get("per_label") and not any(r["changed"]["decided"] for r in results):
        print(
            "warning: the decided rules change no prediction; were these predictions postprocessed already? "
            "(predict with --no-postprocessing)",
            file=sys.stderr,
        )

    fg = [k for k in label_ids if k != 0]
    summary: dict[str, Any] = {"num_cases": len(cases), "rules": rules.get("per_label"), "variants": {}}
    print(f"\n{len(cases)} cases; per label: mean Dice / mean HD95 / max HD95 (mm), [undefined HD95]")
    width = max(len(n) for n in variants)
    print(f"{'variant':<{width}}  " + "  ".join(f"{'label ' + str(k):>24}" for k in fg) + "  mean Dice  changed")
    for name in variants:
        per = {k: _summary(results, name, k) for k in fg}
        summary["variants"][name] = {str(k): v for k, v in per.items()}
        cells = []
        for k in fg:
            s = per[k]
            hd = "-" if s["hd95_mean"] is None else f"{s['hd95_mean']:.1f}/{s['hd95_max']:.1f}"
            und = f" [{s['hd95_undefined']}]" if s["hd95_undefined"] else ""
            cells.append(f"{s['dice']:.4f} / {hd}{und}".rjust(24))
        mean = float(np.mean([per[k]["dice"] for k in fg]))
        summary["variants"][name]["mean_dice"] = mean
        changed = sum(r["changed"][name] for r in results)
        print(f"{name:<{width}}  " + "  ".join(cells) + f"  {mean:.4f}     {changed}/{len(cases)}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
