"""The cross-validation cases a postprocessing search iterates, and the rule that accepts a step.

Used by every stage of :func:`medseg.postprocessing.fit.fit_postprocessing` and
:func:`medseg.postprocessing.volume_fit.fit_min_volume`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from medseg.evaluation.lesion_wise import selection_score
from medseg.options import SelectionMetric
from medseg.postprocessing.operations import apply_postprocessing, label_components
from medseg.progress import progress_bar

#: loads one case: ``(prediction, reference)``, both ``(Z, Y, X)`` maps of original label ids.
CaseLoader = Callable[[str], tuple[np.ndarray, np.ndarray]]
#: one case's voxel spacing: ``case_id -> spacing`` in mm, the label maps' axis order.
SpacingLoader = Callable[[str], Sequence[float]]


class SearchCases:
    """Iterates ``(prediction, reference, spacing)`` (spacing None without ``spacing_of``), keeping the arrays in
    memory while they fit ``limit_bytes``."""

    def __init__(
        self,
        case_ids: Sequence[str],
        load: CaseLoader,
        limit_bytes: int,
        progress: bool,
        spacing_of: SpacingLoader | None = None,
    ) -> None:
        self.case_ids = list(case_ids)
        self.load = load
        self.spacing_of = spacing_of
        self.limit = limit_bytes
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.used = 0
        self.progress = progress

    def _spacing(self, case: str) -> tuple[float, ...] | None:
        return None if self.spacing_of is None else tuple(float(v) for v in self.spacing_of(case))

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]]:
        for case in progress_bar(
            self.case_ids, desc="postprocessing search", unit="case", leave=False, disable=not self.progress
        ):
            if case in self.cache:
                yield (*self.cache[case], self._spacing(case))
                continue
            pred, ref = self.load(case)  # before the spacing: a loader may read it with the reference
            if pred.shape != ref.shape:
                raise ValueError(f"case {case}: prediction shape {pred.shape} != reference shape {ref.shape}")
            dtype = np.uint8 if max(int(pred.max(initial=0)), int(ref.max(initial=0))) < 256 else np.int32
            pred, ref = pred.astype(dtype, copy=False), ref.astype(dtype, copy=False)
            if self.used + pred.nbytes + ref.nbytes <= self.limit:
                self.cache[case] = (pred, ref)
                self.used += pred.nbytes + ref.nbytes
            yield pred, ref, self._spacing(case)


def label_masks(
    cases: SearchCases, rules: dict[str, Any], fg: Sequence[int]
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, int, tuple[float, ...] | None]]:
    """For every case, after the current ``rules``, and every foreground label ``fg[i]``:
    ``(i, seg, mask, ref_mask, n_ref, spacing)``, ``seg`` the postprocessed prediction, ``mask``/``ref_mask`` the
    label's voxels in it and in the reference, ``n_ref`` the reference's voxel count, ``spacing`` the case's."""
    for pred, ref, spacing in cases:
        seg = apply_postprocessing(pred, rules, spacing)
        for i, lab in enumerate(fg):
            ref_mask = ref == lab
            yield i, seg, seg == lab, ref_mask, int(np.count_nonzero(ref_mask)), spacing


def component_subset_scores(
    mask: np.ndarray,
    ref_mask: np.ndarray,
    n_ref: int,
    keeps: Callable[[np.ndarray], Iterable[np.ndarray]],
    metric: SelectionMetric,
) -> np.ndarray | float:
    """One case's score of each candidate subset of a label's predicted components (no mask rebuilt for Dice).

    Args:
        mask, ref_mask: the label's predicted and reference voxels; ``n_ref`` the reference's voxel count.
        keeps: ``sizes`` (voxels per component id, ``sizes[0] = 0`` for the background) -> per candidate a
            boolean per component id, the components it keeps.
        metric: Dice from the per-component overlaps, or the lesion-wise metric on the kept components.

    Returns:
        The score per candidate; for an empty ``mask`` one score for every candidate (1 when the reference is
        empty too, else 0).
    """
    if not mask.any():
        return 1.0 if n_ref == 0 else 0.0
    comps, sizes = label_components(mask)
    overlap = np.bincount(comps[ref_mask], minlength=sizes.size)
    overlap[0] = 0
    scores = []
    for keep in keeps(sizes):
        if metric != SelectionMetric.DICE:
            scores.append(selection_score(keep[comps], ref_mask, metric))
            continue
        denom = int(sizes[keep].sum()) + n_ref
        scores.append(2.0 * int(overlap[keep].sum()) / denom if denom else 1.0)
    return np.asarray(scores, dtype=np.float64)


def best_candidate(scores: np.ndarray, min_improvement: float) -> int:
    """Index of the best of ``scores`` (mean Dice per candidate, index 0 = no step); a step must beat
    "none" by more than ``min_improvement``, and a later step an earlier one by any margin."""
    best = 0
    for j in range(1, len(scores)):
        if scores[j] > scores[best] + (min_improvement if best == 0 else 0.0):
            best = j
    return best


def candidate_name(step: dict | None) -> str:
    """A step's name in ``candidates`` and summaries, e.g. ``remove_small_0.2`` or ``min_volume_0.05ml``."""
    if step is None:
        return "none"
    if step["op"] == "remove_small":
        return f"remove_small_{step['fraction']:.4g}"
    if step["op"] == "min_volume":
        return f"min_volume_{step['ml']:.4g}ml"
    return step["op"]
