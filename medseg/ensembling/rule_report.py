"""find-best's report of the ensemble rules (:mod:`medseg.ensembling.combine`) for the ensemble it chose.

For a winner of two or more members, every rule (mean, weighted, vote, stacking) is scored by mean foreground
Dice over the cross-validation cases, the fitted rules cross-fitted by fold (:func:`~medseg.ensembling.combine.
cross_validated_scores`: a case is scored by weights / a stacker fitted on the other folds' cases only). The
scores go to ``best.json`` (``ensemble_rules``, ``ensemble_rule``: the best); ``medseg predict`` still averages
(applying another rule waits for the predictor's combination step). All members' probabilities of every case
are held in memory while the rules are fitted.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.ensembling.combine import Case, cross_validated_scores
from medseg.evaluation.metrics import dice_from_counts, overlap_counts
from medseg.io.workdir import parse_fold

__all__ = ["ensemble_rule_report"]

logger = logging.getLogger(__name__)


def ensemble_rule_report(
    winner: Sequence[tuple[str, str]],
    predictions: dict[tuple[str, str], dict[str, Path]],
    case_ids: Sequence[str],
    load_probabilities: Callable[[Path], np.ndarray],
    load_reference: Callable[[str], np.ndarray],
    label_ids: Sequence[int],
    ignore_label: int | None,
) -> dict[str, Any]:
    """Each rule's mean foreground Dice on the cross-validation, for ``best.json`` (see the module docstring).

    Args:
        winner: the chosen members (configuration, architecture).
        predictions: ``{member: {case_id: validation npz}}`` (:func:`~medseg.ensembling.runs.find_validation_predictions`).
        case_ids: the cases every member predicted.
        load_probabilities: npz path -> float32 ``(K, Z, Y, X)``.
        load_reference: case id -> reference label ids ``(Z, Y, X)``.
        label_ids: original label id per class index; ``ignore_label``: reference voxels left out (as background).

    Returns:
        ``{"ensemble_rules": {rule: score}, "ensemble_rule": the best rule}``; empty for a single member or cases
        from fewer than two folds.
    """
    if len(winner) < 2:
        return {}
    k = len(label_ids)
    lut = np.zeros(max(label_ids) + 1, dtype=np.int64)
    lut[list(label_ids)] = np.arange(k)
    by_fold: dict[object, list[Case]] = defaultdict(list)
    for case in case_ids:
        ref = load_reference(case)
        ignored = None if ignore_label is None else ref == ignore_label
        ref_idx = lut[np.clip(ref.astype(np.int64), 0, lut.size - 1)]
        probs = np.stack([load_probabilities(predictions[m][case]) for m in winner])
        if ignored is not None:
            ref_idx[ignored] = 0
            probs[:, :, ignored] = 0
            probs[:, 0, ignored] = 1
        by_fold[parse_fold(predictions[winner[0]][case].parent.parent.name)].append((probs, ref_idx))
    if len(by_fold) < 2:
        return {}

    def score(labels: np.ndarray, ref: np.ndarray) -> float:
        return float(dice_from_counts(overlap_counts(labels, ref, k))[1:].mean()) if k > 1 else 1.0

    scores = {str(method): value for method, value in cross_validated_scores(by_fold, score).items()}
    logger.info("ensemble rules on cross-validation: %s", ", ".join(f"{m} {s:.4f}" for m, s in scores.items()))
    return {"ensemble_rules": scores, "ensemble_rule": max(scores, key=lambda rule: scores[rule])}
