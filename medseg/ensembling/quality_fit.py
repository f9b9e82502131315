"""What ``medseg find-best`` fits beside the postprocessing: the temperature and the quality score.

On the chosen ensemble's cross-validation probabilities (mean over its members, original grid):

1. **Temperature** (:mod:`medseg.postprocessing.calibration`): one scalar ``T`` minimising the negative
   log-likelihood of the reference class on the foreground-relevant voxels (at most :data:`SAMPLES_PER_CASE`
   of them per case, a seeded random subset). The expected calibration error (15 bins, same voxels) before
   and after is recorded (in-sample; ``scripts/bench_quality.py`` measures it on held-out cases).
2. **Quality score** (:mod:`medseg.postprocessing.quality_features`): per case, the mean over foreground labels
   of the expected Dice of the postprocessed prediction under the calibrated probabilities, against its real
   mean foreground Dice; a least-squares line maps one to the other (with a non-positive slope: the expected
   Dice shifted by the mean difference; the identity with fewer than :data:`MIN_CASES` cases). ``review_below`` is the cases' median real Dice minus
   :data:`REVIEW_MARGIN` (at least :data:`REVIEW_FLOOR`): a case predicted that far below a typical
   cross-validation case is flagged, and so is every case of a poor model.
3. **Label volumes** from the dataset fingerprint (:mod:`medseg.postprocessing.quality_reference`): per label,
   the log-volume distribution over the training cases that contain it, the fraction containing it and its most
   components; and the joint log-volume mean and covariance of the labels nearly every case contains (the joint
   volume rule, :mod:`medseg.postprocessing.volume_distance`).

Stored as ``calibration`` and ``quality`` entries of ``WORK/postprocessing.json`` (so they travel with the rules
into a bundle); ``medseg predict`` applies them (:class:`~medseg.postprocessing.quality_output.QualityWriter`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.postprocessing.calibration import (
    ECE_BINS,
    MARGIN,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    relevant_voxels,
)
from medseg.postprocessing.operations import apply_postprocessing
from medseg.postprocessing.quality_features import QualityModel, label_features
from medseg.postprocessing.quality_reference import training_volumes

__all__ = ["MIN_CASES", "REVIEW_FLOOR", "REVIEW_MARGIN", "SAMPLES_PER_CASE", "fit_quality"]

logger = logging.getLogger(__name__)

#: Relevant voxels sampled per case for the temperature fit and the error.
SAMPLES_PER_CASE = 20000
#: Fewer cross-validation cases than this: the score stays the expected Dice itself.
MIN_CASES = 5
#: ``review_below`` = median real cross-validation Dice minus this ...
REVIEW_MARGIN = 0.07
#: ... but at least this: a case predicted below it is always reviewed (also when the model itself is poor).
REVIEW_FLOOR = 0.5


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total


def fit_quality(
    work_dir: Path,
    cases: Sequence[str],
    load_probs: Callable[[str], np.ndarray],
    load_ref: Callable[[str], np.ndarray],
    label_ids: Sequence[int],
    rules: Mapping[str, Any] | None,
    ignore_label: int | None = None,
    spacing_of: Callable[[str], Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Fit the temperature and the quality score on cross-validation cases.

    Args:
        work_dir: the work folder (its fingerprint gives the label volumes).
        cases: the cross-validation cases.
        load_probs: case -> the ensemble's mean probabilities ``(K, Z, Y, X)``, original grid.
        load_ref: case -> reference label ids ``(Z, Y, X)``.
        label_ids: the plan's label ids, class-index order (background first).
        rules: the fitted postprocessing (applied before the Dice and features), or None.
        ignore_label: reference voxels of this id are left out.
        spacing_of: case -> voxel spacing (mm) of its label maps, for the rules' ``min_volume`` steps (needed
            only when the rules have one).

    Returns:
        ``{"calibration": {...}, "quality": QualityModel.to_dict()}``.
    """
    ids = np.asarray(label_ids, dtype=np.int64)
    lut = np.zeros(int(ids.max()) + 1, dtype=np.int64)
    lut[ids] = np.arange(ids.size)
    rng = np.random.default_rng(0)
    samples: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for case in cases:
        p = load_probs(case)
        ref = load_ref(case)
        ref_idx = lut[np.clip(ref.astype(np.int64), 0, lut.size - 1)]
        mask = relevant_voxels(p.argmax(0), ref_idx)
        if ignore_label is not None:
            mask &= ref != ignore_label
        where = np.flatnonzero(mask)
        if where.size > SAMPLES_PER_CASE:
            where = np.sort(rng.choice(where, SAMPLES_PER_CASE, replace=False))
        samples.append(p.reshape(p.shape[0], -1)[:, where])
        targets.append(ref_idx.reshape(-1)[where])
    temperature = fit_temperature(samples, targets)
    ece_before = expected_calibration_error(samples, targets)
    ece_after = expected_calibration_error([apply_temperature(s, temperature) for s in samples], targets)
    logger.info(
        "calibration: temperature %.3f; ECE (cross-validation, relevant voxels) %.4f -> %.4f",
        temperature,
        ece_before,
        ece_after,
    )
    volumes, joint_volumes = training_volumes(work_dir, label_ids)
    expected, real = [], []
    for case in cases:
        q = apply_temperature(load_probs(case), temperature)
        ref = load_ref(case)
        spacing = None if spacing_of is None else spacing_of(case)
        pred = apply_postprocessing(ids[q.argmax(0)].astype(np.int32), rules, spacing)
        if ignore_label is not None:
            ignored = ref == ignore_label
            pred, ref = np.where(ignored, 0, pred), np.where(ignored, 0, ref)
        per_label = [label_features(pred == label, q[k], None, 1.0, None) for k, label in enumerate(ids) if k]
        expected.append(float(np.mean([f["expected_dice"] for f in per_label])) if per_label else 1.0)
        real.append(float(np.mean([_dice(pred == label, ref == label) for label in ids[1:]])) if ids.size > 1 else 1.0)
    x, y = np.asarray(expected), np.asarray(real)
    intercept, slope = 0.0, 1.0
    spearman = None
    if len(cases) >= MIN_CASES:
        intercept = float(y.mean() - x.mean())  # the offset alone, when the spread does not support a slope
        slope_fit, intercept_fit = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, 0.0)
        if slope_fit > 0:
            intercept, slope = float(intercept_fit), float(slope_fit)
        ranks_x, ranks_y = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
        spearman = float(np.corrcoef(ranks_x, ranks_y)[0, 1]) if np.ptp(y) > 0 else None
    median = float(np.median(y)) if y.size else 1.0
    model = QualityModel(
        intercept=intercept,
        slope=slope,
        review_below=max(REVIEW_FLOOR, median - REVIEW_MARGIN),
        source="cross-validation",
        volumes=volumes,
        joint_volumes=joint_volumes,
        fit={
            "num_cases": len(cases),
            "median_real_dice": median,
            "mean_expected_dice": float(x.mean()) if x.size else None,
            "mean_real_dice": float(y.mean()) if y.size else None,
            "spearman": spearman,
        },
    )
    logger.info(
        "quality score: real = %.3f + %.3f x expected Dice (%d cases, Spearman %s); review below %.3f",
        intercept,
        slope,
        len(cases),
        "n/a" if spearman is None else f"{spearman:.2f}",
        model.review_below,
    )
    calibration = {
        "temperature": temperature,
        "method": "softmax(log p / T) of the ensemble's mean probabilities (argmax unchanged)",
        "ece_bins": ECE_BINS,
        "relevant_margin_voxels": MARGIN,
        "ece_before": ece_before,
        "ece_after": ece_after,
        "ece_on": "cross-validation cases (in-sample)",
        "num_cases": len(cases),
    }
    return {"calibration": calibration, "quality": model.to_dict()}
