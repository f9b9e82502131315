"""Does medseg know when not to trust a segmentation? Calibration error, and the quality score against real Dice.

    python scripts/bench_quality.py -o OUT --model 3min=WORK3 --model 10min=WORK10 \\
        --held IMAGES LABELS [--foreign IMAGES] [--foreign-model NAME] [--cases N] [--checkpoint [NAME=]CHECKPOINT]

Each ``--model NAME=WORK`` (a work folder on which ``medseg find-best`` ran: its temperature and quality fit
are in ``WORK/postprocessing.json``) predicts the held-out images ``IMAGES`` (``CASE_0000.nii.gz``; references
``LABELS/CASE.nii.gz``) as ``medseg predict -m WORK`` does: the members are chosen by
:func:`medseg.ensembling.work_dir_predictor` (find-best's configurations, architectures and folds from
``WORK/best.json``, so a work folder whose only run is ``3d_fullres/segresnet/fold_0`` predicts with that
run; its postprocessing), with the default prediction time budget and the quality hook of ``medseg predict``
(:class:`medseg.postprocessing.QualityWriter`; ``OUT/NAME/quality.json``). ``--checkpoint snapshots`` (all
models) or ``--checkpoint NAME=snapshots`` (one) makes every snapshot of a ``train --snapshots`` run a member,
as ``medseg predict --checkpoint snapshots`` does; find-best's temperature and score were fitted on the run's
validation predictions, which its final weights made (``final``, the default, is the last snapshot).
``--time-budget-per-case none`` predicts with the full TTA (the default ``auto`` reduces TTA and overlap to fit
a per-case budget, more on a loaded machine: the probabilities, and so the score, then vary with the load).
``--foreign`` images (another dataset, none of the model's structures in them: their real Dice is that of the
prediction against an empty reference, 0 when anything is predicted) go to ``--foreign-model`` (default: the
last model). ``--review-below DICE`` applies ``medseg predict --review-below``: one absolute acceptance level for
every model in place of each model's own threshold (its cross-validation median minus 0.07).

Measured:

- ECE (15 bins, top-class confidence, voxels within 3 voxels of predicted or reference foreground) of each
  model's mean probabilities on the held-out cases, before and after its temperature;
- Spearman correlation of the per-case score with the real mean foreground Dice, within each model (its
  row: how well the score ranks one model's cases) and over all cases pooled (which mostly separates
  models and foreign inputs);
- the ``review`` verdict's hit rate on the cases whose real Dice is more than 0.1 below the median (of the
  row's cases), and its false-alarm rate on the others.

Prints a Markdown table and writes ``OUT/bench_quality.json``. Nothing is written next to the inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from medseg.ensembling import work_dir_predictor
from medseg.inference import predict_folder
from medseg.inference.case_output import FinishedCase, combine_hooks
from medseg.io.image import read_image
from medseg.options import CheckpointName
from medseg.postprocessing import QualityWriter
from medseg.postprocessing.calibration import apply_temperature, expected_calibration_error, relevant_voxels

SAMPLES_PER_CASE = 20000


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total


class Collector:
    """A case hook keeping each case's real Dice and a sample of its relevant voxels' raw mean probabilities."""

    def __init__(self, labels_dir: Path | None) -> None:
        self.labels_dir = labels_dir
        self.dice: dict[str, float] = {}
        self.samples: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.rng = np.random.default_rng(0)

    def __call__(self, case: FinishedCase) -> None:
        ids = case.label_ids
        if self.labels_dir is None:
            ref = np.zeros_like(case.labels)
        else:
            ref = read_image(self.labels_dir / f"{case.case_id}.nii.gz")[0].astype(np.int64)
        self.dice[case.case_id] = float(np.mean([_dice(case.labels == k, ref == k) for k in ids[1:]]))
        if self.labels_dir is None or case.class_probability is None:
            return
        probs = np.stack([case.class_probability(k) for k in ids])
        lut = np.zeros(max(ids) + 1, dtype=np.int64)
        lut[list(ids)] = np.arange(len(ids))
        ref_idx = lut[np.clip(ref, 0, lut.size - 1)]
        where = np.flatnonzero(relevant_voxels(probs.argmax(0), ref_idx))
        if where.size > SAMPLES_PER_CASE:
            where = np.sort(self.rng.choice(where, SAMPLES_PER_CASE, replace=False))
        self.samples.append(probs.reshape(len(ids), -1)[:, where])
        self.targets.append(ref_idx.reshape(-1)[where])


def _predict(
    name: str,
    work: Path,
    images: Path,
    labels: Path | None,
    out: Path,
    cases: int | None,
    checkpoint: str = CheckpointName.FINAL,
    time_budget: str = "auto",
    review_below: float | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    predictor = work_dir_predictor(work, checkpoint=checkpoint, device="cpu")
    rules = getattr(predictor.postprocess, "rules", None)
    writer = QualityWriter(out, rules if isinstance(rules, dict) else None, review_below=review_below)
    collector = Collector(labels)
    source = images
    if cases is not None:  # the first N cases, linked into a folder of their own
        source = out.parent / f"{out.name}_input"
        source.mkdir(parents=True, exist_ok=True)
        for f in sorted(images.glob("*_0000.nii.gz"))[:cases]:
            link = source / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    start = time.perf_counter()
    result = predict_folder(
        source,
        out,
        predictor,
        overwrite=True,
        progress=False,
        time_budget_per_case=_budget(time_budget),
        case_hook=combine_hooks([writer, collector]),
    )
    seconds = time.perf_counter() - start
    assert result.ok, result.summary()
    t = writer.temperature
    summary = {
        "model": name,
        "members": [m.source or f"{m.configuration}/{m.arch}" for m in predictor.members],
        "checkpoint": str(checkpoint),
        "time_budget_per_case": time_budget,
        "review_below": writer.model.review_below,
        "review_below_source": writer.review_below_source,
        "cases": len(collector.dice),
        "temperature": t,
        "ece_before": expected_calibration_error(collector.samples, collector.targets) if collector.samples else None,
        "ece_after": expected_calibration_error([apply_temperature(s, t) for s in collector.samples], collector.targets)
        if collector.samples
        else None,
        "mean_dice": float(np.mean(list(collector.dice.values()))),
        "seconds": seconds,
    }
    rows = [
        {
            "model": name,
            "case": c,
            "foreign": labels is None,
            "dice": collector.dice[c],
            "score": writer.cases[c]["score"],
            "review": writer.cases[c]["verdict"] == "review",
            "reasons": writer.cases[c]["reasons"],
        }
        for c in sorted(collector.dice)
    ]
    return summary, rows


def _rates(rows: list[dict[str, Any]]) -> dict[str, Any]:
    dice = np.asarray([r["dice"] for r in rows])
    score = np.asarray([r["score"] if r["score"] is not None else 0.0 for r in rows])
    review = np.asarray([r["review"] for r in rows])
    median = float(np.median(dice))
    poor = dice < median - 0.1
    rho = float(stats.spearmanr(score, dice).statistic) if np.ptp(dice) > 0 and np.ptp(score) > 0 else None
    return {
        "cases": len(rows),
        "median_dice": median,
        "poor": int(poor.sum()),
        "spearman": rho,
        "hit_rate": float(review[poor].mean()) if poor.any() else None,
        "false_alarm_rate": float(review[~poor].mean()) if (~poor).any() else None,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _budget(value: str) -> float | str | None:
    """``--time-budget-per-case`` as :func:`medseg.inference.predict_folder` takes it."""
    return None if value == "none" else value if value == "auto" else float(value)


def _checkpoints(values: list[str], names: list[str]) -> dict[str, str]:
    """Model name -> checkpoint from ``--checkpoint CHECKPOINT`` (every model) / ``NAME=CHECKPOINT`` entries."""
    chosen = dict.fromkeys(names, str(CheckpointName.FINAL))
    for value in values:
        name, _, checkpoint = value.rpartition("=")
        if checkpoint not in {str(c) for c in CheckpointName}:
            raise SystemExit(f"--checkpoint {value}: {checkpoint!r} is not one of {[str(c) for c in CheckpointName]}")
        if name and name not in chosen:
            raise SystemExit(f"--checkpoint {value}: no --model named {name!r}")
        chosen.update({name: checkpoint} if name else dict.fromkeys(names, checkpoint))
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=WORK")
    parser.add_argument("--held", nargs=2, type=Path, required=True, metavar=("IMAGES", "LABELS"))
    parser.add_argument("--foreign", type=Path, default=None, metavar="IMAGES")
    parser.add_argument("--foreign-model", default=None)
    parser.add_argument("--cases", type=int, default=None, help="only the first N held-out cases")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="[NAME=]CHECKPOINT",
        help="final (default), best, latest or snapshots, for every model or the one named",
    )
    parser.add_argument(
        "--time-budget-per-case",
        default="auto",
        metavar="auto|none|SECONDS",
        help="as medseg predict's (default auto: TTA and overlap reduced to fit; none: full TTA)",
    )
    parser.add_argument(
        "--review-below",
        type=float,
        default=None,
        metavar="DICE",
        help="as medseg predict's: an absolute acceptance level for every model instead of each model's own threshold",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    models = [tuple(m.split("=", 1)) for m in args.model]
    checkpoints = _checkpoints(args.checkpoint, [name for name, _ in models])
    summaries, rows = [], []
    for name, work in models:
        summary, model_rows = _predict(
            name,
            Path(work),
            args.held[0],
            args.held[1],
            args.output / name,
            args.cases,
            checkpoints[name],
            args.time_budget_per_case,
            args.review_below,
        )
        summaries.append(summary)
        rows += model_rows
    if args.foreign is not None:
        name = args.foreign_model or models[-1][0]
        work = dict(models)[name]
        summary, foreign_rows = _predict(
            f"{name}+foreign",
            Path(work),
            args.foreign,
            None,
            args.output / "foreign",
            None,
            checkpoints[name],
            args.time_budget_per_case,
            args.review_below,
        )
        summaries.append(summary)
        rows += foreign_rows
    pooled = _rates(rows)
    per_model = {s["model"]: _rates([r for r in rows if f"{r['model']}" == s["model"]]) for s in summaries}
    lines = [
        "| set | cases | T | ECE before | ECE after | mean Dice | Spearman | review hit | review false alarm |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        r = per_model[s["model"]]
        lines.append(
            f"| {s['model']} | {s['cases']} | {_fmt(s['temperature'], 2)} | {_fmt(s['ece_before'])} | "
            f"{_fmt(s['ece_after'])} | {_fmt(s['mean_dice'])} | {_fmt(r['spearman'], 2)} | "
            f"{_fmt(r['hit_rate'], 2)} ({r['poor']}) | {_fmt(r['false_alarm_rate'], 2)} |"
        )
    lines.append(
        f"| **pooled** | {pooled['cases']} | | | | median {_fmt(pooled['median_dice'])} | "
        f"**{_fmt(pooled['spearman'], 2)}** | **{_fmt(pooled['hit_rate'], 2)}** ({pooled['poor']}) | "
        f"**{_fmt(pooled['false_alarm_rate'], 2)}** |"
    )
    held = _rates([r for r in rows if not r["foreign"]])
    lines.append(
        f"| pooled, held-out cases only | {held['cases']} | | | | median {_fmt(held['median_dice'])} | "
        f"{_fmt(held['spearman'], 2)} | {_fmt(held['hit_rate'], 2)} ({held['poor']}) | "
        f"{_fmt(held['false_alarm_rate'], 2)} |"
    )
    print("\n".join(lines))
    args.output.mkdir(parents=True, exist_ok=True)
    document = {"models": summaries, "pooled": pooled, "held_out": held, "per_model": per_model, "cases": rows}
    (args.output / "bench_quality.json").write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
