"""``medseg find-best --try-crf``: keep the dense CRF (:mod:`medseg.postprocessing.crf`) only where it pays.

After the connected-component/morphology rules are fitted, each candidate CRF setting (:data:`CRF_CANDIDATES`) is
run on the chosen ensemble's mean cross-validation probabilities of every case with the case's image (first
channel, ``imagesTr`` of the dataset), followed by the fitted rules; the best setting is kept (stored under
``"crf"`` in ``WORK/postprocessing.json``) only when its mean foreground Dice beats the rules alone. Every
candidate's score and the CRF's mean time per case are recorded under ``"crf_search"``. Off by default: on a
network trained for the README's 30 minutes (hippocampus, docs/benchmarks.md, issue 37) no setting beat the rules
and a forced CRF moved held-out Dice by +0.0001; it helped (+0.018) only a network of about 100 iterations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medseg.ensembling.references import dataset_root
from medseg.errors import MedsegError
from medseg.evaluation.metrics import dice_from_counts, overlap_counts
from medseg.io.dataset import load_dataset
from medseg.io.image import read_image
from medseg.postprocessing.crf import CrfParams, crf_labels
from medseg.postprocessing.crf_output import CRF_KEY
from medseg.postprocessing.operations import apply_postprocessing

__all__ = ["CRF_CANDIDATES", "image_loader", "select_crf"]

logger = logging.getLogger(__name__)

#: the settings find-best tries: the default, a weaker one, a stronger and wider one
CRF_CANDIDATES: tuple[CrfParams, ...] = (
    CrfParams(),
    CrfParams(bilateral_weight=0.5, spatial_weight=0.25),
    CrfParams(bilateral_weight=2.0, spatial_weight=1.0, bilateral_mm=5.0),
)

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
    """Add the best CRF setting to ``rules`` when it improves the mean foreground Dice (see the module docstring).

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
    sums = np.zeros((len(candidates) + 1, k))
    seconds = 0.0
    for case in tqdm(case_ids, desc="CRF search", unit="case", disable=not progress):
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
            sums[i] += dice_from_counts(overlap_counts(lut[pred], ref_idx, k))
    means = sums[:, 1:].mean(1) / max(1, len(case_ids)) if k > 1 else np.ones(len(sums))
    best = int(np.argmax(means))
    rules["crf_search"] = {
        "mean_foreground_dice_without": float(means[0]),
        "candidates": [{**p.to_dict(), "mean_foreground_dice": float(m)} for p, m in zip(candidates, means[1:])],
        "seconds_per_case": seconds / max(1, len(case_ids) * len(candidates)),
    }
    if best > 0:
        rules[CRF_KEY] = candidates[best - 1].to_dict()
        logger.info("CRF kept: mean foreground Dice %.4f -> %.4f", means[0], means[best])
    else:
        rules.pop(CRF_KEY, None)
        logger.info("CRF not kept: no setting beats the rules alone (%.4f)", means[0])
    return rules
