"""``medseg find-best --try-crf``: keep the dense CRF (:mod:`medseg.postprocessing.crf`) only where it pays.

After the connected-component/morphology rules are fitted, each candidate CRF setting (:data:`CRF_CANDIDATES`) is
run on the chosen ensemble's mean cross-validation probabilities of every case with the case's image (first
channel, ``imagesTr`` of the dataset), followed by the fitted rules. The setting with the best mean foreground
Dice is kept (stored under ``"crf"`` in ``WORK/postprocessing.json``) only when the evidence is clear: its per-case
gain over the rules alone is positive on average and at least :data:`MIN_GAIN_SE` paired standard errors (with
fewer than 2 cases, never). Otherwise no CRF, as nnU-Net (which has none): on a network trained at the README's
30-minute operating point (hippocampus, docs/benchmarks.md, issue 37) the best setting beat the rules by 0.000004
CV Dice in one seed and lost in the other, and forcing it moved held-out Dice by +0.0001 / -0.0002; a strict
"beats the rules" test kept it on that noise. Every candidate's score, the best one's gain and its standard error,
and the CRF's mean time per case are recorded under ``"crf_search"``. It helped (+0.018) only a network of about
100 iterations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.ensembling.references import dataset_root
from medseg.errors import MedsegError
from medseg.evaluation.metrics import dice_from_counts, overlap_counts
from medseg.io.dataset import load_dataset
from medseg.io.image import read_image
from medseg.postprocessing.crf import CrfParams, crf_labels
from medseg.postprocessing.crf_output import CRF_KEY
from medseg.postprocessing.operations import apply_postprocessing
from medseg.progress import progress_bar

__all__ = ["CRF_CANDIDATES", "MIN_GAIN_SE", "image_loader", "select_crf"]

logger = logging.getLogger(__name__)

#: the settings find-best tries: the default, a weaker one, a stronger and wider one
CRF_CANDIDATES: tuple[CrfParams, ...] = (
    CrfParams(),
    CrfParams(bilateral_weight=0.5, spatial_weight=0.25),
    CrfParams(bilateral_weight=2.0, spatial_weight=1.0, bilateral_mm=5.0),
)

#: the best setting is kept only when its mean per-case gain is at least this many paired standard errors (about a
#: one-sided 2.5% test per setting; the best of three is picked on the same cases, so a lower bar keeps noise)
MIN_GAIN_SE = 2.0

#: ``case_id -> (image (Z, Y, X) first channel, spacing (mm, same order))``
ImageLoader = Callable[[str], tuple[np.ndarray, tuple[float, ...]]]


def image_loader(work_dir: Path, data_dir: str | Path | None) -> ImageLoader:
    """The training images' first channel by case id, from ``data_dir`` (default: the dataset ``medseg plan`` saw).

    Raises:
        MedsegError: the dataset folder is unknown or gone.
    """
    root = dataset_root(work_dir, data_dir)
    if root is None or not root.is_dir():
        raise MedsegError(f"{work_dir}: the CRF search needs the training images; pass --data DATASET_FOLDER")
    files = {case.case_id: case.image_files[0] for case in load_dataset(root).cases}

    def load(case_id: str) -> tuple[np.ndarray, tuple[float, ...]]:
        if case_id not in files:
            raise MedsegError(f"{root}: no image of case {case_id}")
        image, geometry = read_image(files[case_id])
        return image.astype(np.float32), tuple(geometry.spacing)

    return load


def select_crf(
    case_ids: Sequence[str],
    load_case: Callable[[str], tuple[np.ndarray, np.ndarray]],
    load_image: ImageLoader,
    rules: dict[str, Any],
    label_ids: Sequence[int],
    candidates: Sequence[CrfParams] = CRF_CANDIDATES,
    progress: bool = True,
) -> dict[str, Any]:
    """Add the best CRF setting to ``rules`` when it clearly improves the mean foreground Dice (module docstring).

    Args:
        case_ids: the cross-validation cases.
        load_case: ``case_id -> (mean probabilities (K, Z, Y, X), reference label ids (Z, Y, X))``; reference
            voxels to ignore must already be 0 in the reference (and are scored as background).
        load_image: see :func:`image_loader`.
        rules: the fitted rules (applied after the CRF); updated in place and returned.
        label_ids: original label id per class index (background first).
        candidates: settings to try.
        progress: tqdm bar.

    Returns:
        ``rules`` with ``"crf_search"`` and, when the CRF is kept, ``"crf"``.
    """
    k = len(label_ids)
    lut = np.zeros(max(label_ids) + 1, dtype=np.int64)
    lut[list(label_ids)] = np.arange(k)
    per_case = np.zeros((len(case_ids), len(candidates) + 1))  # mean foreground Dice, column 0 = rules alone
    seconds = 0.0
    for row, case in enumerate(progress_bar(case_ids, desc="CRF search", unit="case", disable=not progress)):
        probs, ref = load_case(case)
        image, spacing = load_image(case)
        ref_idx = lut[np.clip(ref.astype(np.int64), 0, lut.size - 1)]
        plain = apply_postprocessing(np.asarray(label_ids, dtype=np.int32)[probs.argmax(0)], rules, spacing)
        preds = [plain]
        for params in candidates:
            start = time.perf_counter()
            preds.append(apply_postprocessing(crf_labels(probs, image, spacing, label_ids, params), rules, spacing))
            seconds += time.perf_counter() - start
        for i, pred in enumerate(preds):
            per_case[row, i] = dice_from_counts(overlap_counts(lut[pred], ref_idx, k))[1:].mean() if k > 1 else 1.0
    means = per_case.mean(0) if len(case_ids) else np.ones(per_case.shape[1])
    best = int(np.argmax(means[1:])) + 1 if len(candidates) else 0
    gain, se = _paired_gain(per_case[:, best] - per_case[:, 0]) if best else (0.0, None)
    kept = best > 0 and gain > 0 and se is not None and gain >= MIN_GAIN_SE * se
    rules["crf_search"] = {
        "mean_foreground_dice_without": float(means[0]),
        "candidates": [{**p.to_dict(), "mean_foreground_dice": float(m)} for p, m in zip(candidates, means[1:])],
        "best_gain": gain,
        "best_gain_se": se,
        "rule": f"kept when the best setting's mean per-case gain is > 0 and >= {MIN_GAIN_SE:g} paired standard errors",
        "seconds_per_case": seconds / max(1, len(case_ids) * len(candidates)),
    }
    if kept:
        rules[CRF_KEY] = candidates[best - 1].to_dict()
        logger.info(
            "CRF kept: mean foreground Dice %.4f -> %.4f (gain %+.4f, SE %.4f)", means[0], means[best], gain, se
        )
    else:
        rules.pop(CRF_KEY, None)
        logger.info(
            "CRF not kept: the best setting's gain over the rules alone (%.4f) is %+.4f, SE %s: below %g SE",
            means[0],
            gain,
            "-" if se is None else f"{se:.4f}",
            MIN_GAIN_SE,
        )
    return rules


def _paired_gain(diffs: np.ndarray) -> tuple[float, float | None]:
    """Mean of the per-case differences and its standard error (None with fewer than 2 cases)."""
    if diffs.size == 0:
        return 0.0, None
    mean = float(diffs.mean())
    return mean, (float(diffs.std(ddof=1) / np.sqrt(diffs.size)) if diffs.size > 1 else None)
