"""The minimum component volume stage of the postprocessing search: candidates from the reference lesions' volumes.

A ``min_volume`` step (:mod:`medseg.postprocessing.operations`) removes a label's components below a volume in mL
at each case's own voxel spacing. Its candidates per label come from that label's reference components over the
cross-validation cases (their volumes at each case's spacing): half the smallest volume, and the quantiles
:data:`DEFAULT_VOLUME_QUANTILES` (the smallest, 5 %, 10 %, 25 %) of the volumes, distinct values only; a label
without reference components gets none. A threshold at or below the smallest reference lesion cannot remove a
lesion predicted at its true size, so the candidates aim at false specks smaller than any real lesion, and the
cross-validation metric decides whether one helps (:func:`~medseg.postprocessing.search_cases.best_candidate`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np

from medseg.io.image import voxel_ml
from medseg.options import SelectionMetric
from medseg.postprocessing.operations import label_components
from medseg.postprocessing.search_cases import (
    SearchCases,
    best_candidate,
    candidate_name,
    component_subset_scores,
    label_masks,
)

#: Quantiles of a label's reference component volumes tried as minimum component volumes (0 = the smallest).
DEFAULT_VOLUME_QUANTILES: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25)


def volume_candidates(volumes_ml: Sequence[float], quantiles: Sequence[float]) -> list[float]:
    """Minimum-component-volume candidates (mL, ascending, distinct) from reference component volumes.

    Args:
        volumes_ml: the volume of every reference component of one label, mL.
        quantiles: quantiles of ``volumes_ml`` to try (0 = the smallest volume).

    Returns:
        Half the smallest volume and the ``quantiles`` of ``volumes_ml``; empty without volumes.
    """
    if len(volumes_ml) == 0:
        return []
    v = np.asarray(volumes_ml, dtype=np.float64)
    values = [0.5 * float(v.min()), *(float(np.quantile(v, q)) for q in quantiles)]
    return sorted({x for x in values if x > 0})


def reference_volumes(cases: SearchCases, fg: Sequence[int]) -> list[list[float]]:
    """Per foreground label: the volume (mL) of every reference component over the cases."""
    volumes: list[list[float]] = [[] for _ in fg]
    for _pred, ref, spacing in cases:
        for i, lab in enumerate(fg):
            mask = ref == lab
            if spacing is not None and mask.any():
                sizes = label_components(mask)[1][1:]
                volumes[i].extend((sizes * voxel_ml(spacing)).tolist())
    return volumes


def _volume_keeps(sizes: np.ndarray, ml_per_voxel: float, thresholds: Sequence[float]) -> Iterator[np.ndarray]:
    """Per threshold (mL), the components (ids; 0 = background never) at least that large."""
    volumes = sizes * ml_per_voxel
    for t in thresholds:
        keep = volumes >= t
        keep[0] = False
        yield keep


def fit_min_volume(
    cases: SearchCases,
    rules: dict[str, Any],
    fg: Sequence[int],
    quantiles: Sequence[float],
    metric: SelectionMetric,
    min_improvement: float,
    candidates: dict[str, Any],
) -> None:
    """Stage 2 of :func:`~medseg.postprocessing.fit.fit_postprocessing`: add the best ``min_volume`` step per label to ``rules`` (in place)
    when it beats none by more than ``min_improvement``; every candidate's score goes into ``candidates``."""
    thresholds = [volume_candidates(v, quantiles) for v in reference_volumes(cases, fg)]
    if not any(thresholds):
        return
    scores = [np.zeros(1 + len(t)) for t in thresholds]
    for i, _seg, mask, ref_mask, n_ref, spacing in label_masks(cases, rules, fg):
        if not thresholds[i] or spacing is None:
            continue
        tried = (0.0, *thresholds[i])
        keeps = partial(_volume_keeps, ml_per_voxel=voxel_ml(spacing), thresholds=tried)
        scores[i] += component_subset_scores(mask, ref_mask, n_ref, keeps, metric)
    for i, lab in enumerate(fg):
        if not thresholds[i]:
            continue
        mean = scores[i] / len(cases.case_ids)
        steps = [{"op": "min_volume", "ml": t} for t in thresholds[i]]
        scored = candidates.setdefault(str(lab), {"none": float(mean[0])})
        scored.update({candidate_name(s): float(m) for s, m in zip(steps, mean[1:])})
        best = best_candidate(mean, min_improvement)
        if best:
            rules["per_label"].setdefault(str(lab), []).append(steps[best - 1])
