"""Pick the best configuration / architecture / ensemble on the cross-validation, and its postprocessing.

Every (configuration, architecture) with validation predictions in ``WORK/runs`` is a candidate, and so
is every ensemble of two or more of them (mean of their softmax probabilities). Candidates are ranked by
the mean foreground Dice over the cases every candidate predicted (mean over cases of the mean over
foreground labels; a label absent from both prediction and reference counts as Dice 1). Ties go to the
smaller ensemble. Postprocessing is then fitted on the winner's predictions; the choice is saved as
``WORK/best.json`` and the rules as ``WORK/postprocessing.json`` (both atomic), which ``medseg predict``
uses by default. Beside the rules, the winner's probability temperature and quality-score fit are stored
(:mod:`medseg.ensembling.quality_fit`).

``metric`` (:class:`~medseg.options.SelectionMetric`) ranks by and fits the postprocessing to a lesion-wise
metric instead (``lesion_f1``, ``lesion_dice`` or ``pq`` per foreground label, IoU matching, see
:mod:`medseg.evaluation.lesion_wise`), averaged the same way; Dice per label is still reported.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.ensembling.crf_selection import image_loader, select_crf
from medseg.ensembling.quality_fit import fit_quality
from medseg.ensembling.references import reference_loader
from medseg.ensembling.rule_report import ensemble_rule_report
from medseg.ensembling.runs import find_validation_predictions, folds_of
from medseg.errors import MedsegError
from medseg.evaluation.lesion_wise import selection_score
from medseg.evaluation.metrics import dice_from_counts, overlap_counts
from medseg.io.image import atomic_write_text
from medseg.io.workdir import WorkDir
from medseg.options import SelectionMetric, parse_option
from medseg.planning.plan import Plan
from medseg.postprocessing.fit import describe_rules, fit_postprocessing
from medseg.postprocessing.operations import RULES_FORMAT, save_rules
from medseg.preprocessing.regions import dice_per_region, region_key, regions_to_labels
from medseg.progress import progress_bar

logger = logging.getLogger(__name__)

Member = tuple[str, str]  # (configuration, arch)

#: With more single candidates than this, only singles, pairs and the full ensemble are ranked.
MAX_EXHAUSTIVE = 6


@dataclass
class FindBestResult:
    """What :func:`find_best` chose.

    Attributes:
        members: the winning (configuration, architecture) pairs.
        folds: folds whose networks form the ensemble.
        score: its mean foreground Dice (or ``metric``) on the cross-validation (before postprocessing).
        score_postprocessed: the same after postprocessing.
        ranking: every candidate's name and score, best first.
        dice_per_label: the winner's mean Dice per label id.
        postprocessing: the fitted rules.
        num_cases: cases the ranking used.
        predict_command: the command that predicts with this choice.
        best_path: where the choice was saved.
        metric: what ranked the candidates (``dice`` or a lesion-wise metric).
        metric_per_label: the winner's mean ``metric`` per label id (lesion-wise metrics only).
    """

    members: list[Member]
    folds: list[int]
    score: float
    score_postprocessed: float
    ranking: list[tuple[str, float]]
    dice_per_label: dict[str, float]
    postprocessing: dict[str, Any]
    num_cases: int
    predict_command: str
    best_path: Path
    extra: dict[str, Any] = field(default_factory=dict)
    metric: str = SelectionMetric.DICE.value
    metric_per_label: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The content of ``best.json``."""
        return {
            "format": "medseg-best-v1",
            "members": [{"configuration": c, "arch": a} for c, a in self.members],
            "configs": sorted({c for c, _ in self.members}),
            "archs": sorted({a for _, a in self.members}),
            "folds": self.folds,
            "score": self.score,
            "score_postprocessed": self.score_postprocessed,
            "dice_per_label": self.dice_per_label,
            "num_cases": self.num_cases,
            **({"metric": self.metric, "metric_per_label": self.metric_per_label} if self.metric_per_label else {}),
            "ranking": [{"candidate": n, f"mean_foreground_{self.metric}": s} for n, s in self.ranking],
            "postprocessing": WorkDir.POSTPROCESSING,
            "postprocessing_summary": describe_rules(self.postprocessing),
            "predict_command": self.predict_command,
            **self.extra,
        }

    def summary(self) -> str:
        what = "Dice" if self.metric == SelectionMetric.DICE else self.metric
        lines = [f"cross-validation ranking over {self.num_cases} cases (mean foreground {what}):"]
        width = max(len(n) for n, _ in self.ranking)
        for i, (name, score) in enumerate(self.ranking):
            lines.append(f"  {'*' if i == 0 else ' '} {name:<{width}}  {score:.4f}")
        lines.append(
            f"best: {_name(self.members)} (folds {self.folds}); postprocessing: "
            f"{describe_rules(self.postprocessing)} -> {self.score_postprocessed:.4f}"
        )
        lines.append(f"saved to {self.best_path}")
        return "\n".join(lines)


def _name(members: Sequence[Member]) -> str:
    return " + ".join(f"{c}/{a}" for c, a in members)


def _candidates(members: list[Member]) -> list[tuple[Member, ...]]:
    n = len(members)
    sizes = range(1, n + 1) if n <= MAX_EXHAUSTIVE else sorted({1, 2, n})
    return [combo for r in sizes for combo in itertools.combinations(members, r)]


def _region_dice(probs: np.ndarray, ref: np.ndarray, plan: Plan, ignored: np.ndarray | None) -> np.ndarray:
    """Dice per region (both empty -> 1) of region probabilities ``(R, *ref.shape)`` against label ids ``ref``."""
    pred = regions_to_labels(probs, plan.regions_class_order or ())
    dice = dice_per_region(pred, ref, plan.regions or (), None if ignored is None else plan.ignore_label)
    return np.asarray([1.0 if v is None else v for v in dice.values()])


def _load_probabilities(path: Path) -> np.ndarray:
    try:
        with np.load(path) as f:
            return f["probabilities"].astype(np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise MedsegError(f"{path}: unreadable validation probabilities ({exc})") from None


def _summed(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """The element-wise sum of one or more arrays, added left to right as ``sum()`` adds them.

    Args:
        arrays: at least one array, all of one shape.

    Returns:
        Their sum (the first array itself when there is only one).
    """
    return functools.reduce(operator.add, arrays)


def _lesion_scores(
    pred_ids: np.ndarray, ref_ids: np.ndarray, keys: Sequence[Any], metric: SelectionMetric
) -> np.ndarray:
    """``metric`` per key: a label id (mask ``== id``) or a region (mask: id in the region)."""
    return np.asarray(
        [
            selection_score(np.isin(pred_ids, k), np.isin(ref_ids, k), metric)
            if isinstance(k, tuple)
            else selection_score(pred_ids == k, ref_ids == k, metric)
            for k in keys
        ]
    )


def find_best(
    work_dir: str | Path,
    data_dir: str | Path | None = None,
    progress: bool = True,
    metric: SelectionMetric | str = SelectionMetric.DICE,
    try_crf: bool = False,
) -> FindBestResult:
    """Rank configurations/architectures and their ensembles on the cross-validation; save the best.

    Args:
        work_dir: the work folder (``plans.json``, ``runs/``).
        data_dir: dataset folder with ``labelsTr`` (default: the one ``medseg plan`` recorded).
        progress: tqdm bars.
        metric: rank and fit postprocessing by mean foreground Dice (default) or a lesion-wise metric.
        try_crf: also try the dense CRF after the rules (:mod:`medseg.ensembling.crf_selection`, by Dice).

    Returns:
        :class:`FindBestResult`; ``WORK/best.json`` and ``WORK/postprocessing.json`` are written.

    Raises:
        MedsegError: no plan, no validation predictions, no case predicted by every candidate, or a
            prediction that does not fit its reference.
    """
    work_dir = Path(work_dir)
    metric = parse_option(SelectionMetric, metric, "metric")
    lesion = metric != SelectionMetric.DICE
    wd = WorkDir(work_dir)
    plan = Plan.load(wd.plans)
    preds = find_validation_predictions(work_dir)
    if not preds:
        raise MedsegError(
            f"{wd.runs_root}: no cross-validation predictions (.npz files in the validation folders of numbered "
            f"folds); train folds with "
            f"`medseg train {work_dir} --fold 0` ... (final validation on) first"
        )
    members = sorted(preds)
    common = sorted(set.intersection(*(set(p) for p in preds.values())))
    if not common:
        raise MedsegError(
            "no case has a validation prediction from every trained configuration/architecture "
            f"({', '.join(f'{_name([m])}: folds {folds_of(preds[m])}' for m in members)}); "
            "train the same folds for each"
        )
    for m in members:
        if len(preds[m]) > len(common):
            logger.info(
                "%s: ranking uses %d of its %d validation cases (those every candidate has)",
                _name([m]),
                len(common),
                len(preds[m]),
            )
    label_ids = [int(v) for v in plan.label_ids]
    k = len(label_ids)
    lut = np.zeros(max(label_ids) + 1, dtype=np.int64)
    lut[label_ids] = np.arange(k)
    load_ref = reference_loader(work_dir, plan, data_dir)
    candidates = _candidates(members)
    regions = plan.regions or ()  # region plans: sigmoid probabilities per region, Dice per region
    k_out = plan.num_classes
    dice_sums = np.zeros((len(candidates), len(regions) or k))
    metric_sums = np.zeros_like(dice_sums)  # lesion-wise metric per region / label index (lesion metrics)

    ignore = plan.ignore_label  # unannotated reference voxels: left out of prediction and reference

    for case in progress_bar(common, desc="find-best", unit="case", disable=not progress):
        ref = load_ref(case)
        ref_idx = lut[np.clip(ref.astype(np.int64), 0, lut.size - 1)]
        ignored = None if ignore is None else ref == ignore
        if ignored is not None:
            ref_idx[ignored] = 0
        probs = {}
        for m in members:
            p = _load_probabilities(preds[m][case])
            if p.shape != (k_out, *ref.shape):
                raise MedsegError(
                    f"{preds[m][case]}: probabilities of shape {list(p.shape)} do not fit the reference "
                    f"(K={k_out}, {list(ref.shape)})"
                )
            probs[m] = p
        for i, combo in enumerate(candidates):
            total = _summed(probs[m] for m in combo)
            if regions:
                dice_sums[i] += _region_dice(total / len(combo), ref, plan, ignored)
                if lesion:
                    pred_r = regions_to_labels(total / len(combo), plan.regions_class_order or ())
                    ref_r = ref if ignored is None else np.where(ignored, 0, ref)
                    if ignored is not None:
                        pred_r[ignored] = 0
                    metric_sums[i] += _lesion_scores(pred_r, ref_r, list(regions), metric)
                continue
            pred_idx = total.argmax(0)
            if ignored is not None:
                pred_idx[ignored] = 0
            dice_sums[i] += dice_from_counts(overlap_counts(pred_idx, ref_idx, k))
            if lesion:
                metric_sums[i, 1:] += _lesion_scores(pred_idx, ref_idx, range(1, k), metric)
    dice_means = dice_sums / len(common)
    means = metric_sums / len(common) if lesion else dice_means
    scores = means.mean(1) if regions else means[:, 1:].mean(1) if k > 1 else np.ones(len(candidates))
    order = sorted(range(len(candidates)), key=lambda i: (-round(float(scores[i]), 10), len(candidates[i]), i))
    ranking = [(_name(candidates[i]), float(scores[i])) for i in order]
    best_i = order[0]
    winner = list(candidates[best_i])
    logger.info("best on cross-validation: %s (mean foreground %s %.4f)", _name(winner), metric, scores[best_i])

    def load_pair(case: str) -> tuple[np.ndarray, np.ndarray]:
        total = _summed(_load_probabilities(preds[m][case]) for m in winner)
        pred = (
            regions_to_labels(total / len(winner), plan.regions_class_order or ()).astype(np.int32)
            if regions
            else np.asarray(label_ids, dtype=np.int32)[total.argmax(0)]
        )
        ref = load_ref(case)
        if ignore is not None:
            ignored = ref == ignore
            pred[ignored], ref = 0, np.where(ignored, 0, ref)
        return pred, ref

    if regions:  # per-region postprocessing is not searched: the rules change nothing
        logger.info("region-based plan: no postprocessing is fitted (per-region postprocessing is not supported)")
        score = float(scores[best_i])
        rules: dict[str, Any] = {
            "format": RULES_FORMAT,
            "label_ids": label_ids,
            "foreground_largest_component": False,
            "per_label": {},
            "note": "region-based plan: postprocessing not fitted",
            "scores": {
                "num_cases": len(common),
                f"mean_foreground_{metric}_before": score,
                f"mean_foreground_{metric}_after": score,
            },
        }
    else:
        rules = fit_postprocessing(
            common, load_pair, label_ids, progress=progress, metric=metric, spacing_of=load_ref.spacing
        )

        def mean_probs(case: str) -> np.ndarray:
            return _summed(_load_probabilities(preds[m][case]) for m in winner) / len(winner)

        if try_crf:

            def crf_case(case: str) -> tuple[np.ndarray, np.ndarray]:
                ref = load_ref(case)
                return mean_probs(case), ref if ignore is None else np.where(ref == ignore, 0, ref)

            rules = select_crf(common, crf_case, image_loader(work_dir, data_dir), rules, label_ids, progress=progress)
        rules.update(fit_quality(work_dir, common, mean_probs, load_ref, label_ids, rules, ignore, load_ref.spacing))
    rules["fitted_on"] = {"members": [list(m) for m in winner], "num_cases": len(common)}
    save_rules(rules, wd.postprocessing)

    folds = sorted(set.intersection(*(set(folds_of(preds[m])) for m in winner)))
    # mean/weighted/vote/stacking on the CV (label plans)
    report = (
        {} if regions else ensemble_rule_report(winner, preds, common, _load_probabilities, load_ref, label_ids, ignore)
    )
    result = FindBestResult(
        members=winner,
        folds=folds,
        score=float(scores[best_i]),
        score_postprocessed=float(rules["scores"][f"mean_foreground_{metric}_after"]),
        ranking=ranking,
        dice_per_label={region_key(r): float(dice_means[best_i, j]) for j, r in enumerate(regions)}
        if regions
        else {str(label_ids[j]): float(dice_means[best_i, j]) for j in range(1, k)},
        postprocessing=rules,
        num_cases=len(common),
        predict_command=f"medseg predict -i INPUT_FOLDER -o OUTPUT_FOLDER -m {work_dir}",
        best_path=wd.best,
        extra=report,
        metric=str(metric),
        metric_per_label=(
            {region_key(r): float(means[best_i, j]) for j, r in enumerate(regions)}
            if regions
            else {str(label_ids[j]): float(means[best_i, j]) for j in range(1, k)}
        )
        if lesion
        else {},
    )
    atomic_write_text(result.best_path, json.dumps(result.to_dict(), indent=2) + "\n")
    return result
