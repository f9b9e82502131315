"""Choose postprocessing per label from cross-validation predictions.

Greedy search, one stage after the other, each stage evaluated on the result of the previous ones:

1. ``foreground_largest_component`` (only with two or more foreground labels): kept when the mean
   foreground Dice improves and no label's mean Dice gets worse.
2. Per label, a minimum component volume in mL (only with each case's voxel spacing, ``spacing_of``): none,
   or remove the components below each candidate volume, derived from the label's reference components
   (:mod:`medseg.postprocessing.volume_fit`). The best candidate is kept when it improves that label's
   mean Dice by more than ``min_improvement``. It comes before the relative rules of stage 3: a physical
   floor removes specks without touching small true lesions, which ``remove_small`` would drop with them.
3. Per label, connected components: none, remove components below ``f`` x the largest for each ``f`` in
   ``fractions``, keep the largest component; same acceptance rule.
4. Per label, morphology: none, opening, closing (radius 1 voxel), same acceptance rule.

Steps of stages 2-4 only change their own label's mask (removed voxels become background, closing only
claims background), so no other label can get worse; a final pass verifies this on the chained result
and drops a label's steps if its Dice fell below the unprocessed one. Dice per case follows
:mod:`medseg.evaluation.metrics` (both empty = 1); scores are means over cases.

With a lesion-wise ``metric`` (``lesion_f1``, ``lesion_dice`` or ``pq``, see
:mod:`medseg.evaluation.lesion_wise`, default IoU matching) every stage scores its candidates by that
metric per label instead of Dice (slower: components are labelled per candidate), and the scores are
recorded under the metric's name (``lesion_f1_before``, ``mean_foreground_lesion_f1_after``, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from medseg.evaluation.lesion_wise import selection_score
from medseg.evaluation.metrics import dice_from_counts, overlap_counts
from medseg.options import SelectionMetric, parse_option
from medseg.postprocessing.operations import (
    RULES_FORMAT,
    apply_postprocessing,
    keep_components,
    morphology,
)
from medseg.postprocessing.search_cases import (
    CaseLoader,
    SearchCases,
    SpacingLoader,
    best_candidate,
    candidate_name,
    component_subset_scores,
    label_masks,
)
from medseg.postprocessing.volume_fit import DEFAULT_VOLUME_QUANTILES, fit_min_volume

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 1.0 / 3.0, 0.5)


def _label_dice(pred: np.ndarray, ref: np.ndarray, lut: np.ndarray, k: int) -> np.ndarray:
    return dice_from_counts(overlap_counts(lut[pred], lut[ref], k))


def _label_scores(
    pred: np.ndarray, ref: np.ndarray, lut: np.ndarray, label_ids: Sequence[int], metric: SelectionMetric
) -> np.ndarray:
    """Score per label index (Dice, or ``metric`` per foreground label with 1.0 for background)."""
    if metric == SelectionMetric.DICE:
        return _label_dice(pred, ref, lut, len(label_ids))
    return np.asarray([1.0 if lab == 0 else selection_score(pred == lab, ref == lab, metric) for lab in label_ids])


def _mask_dice(mask: np.ndarray, ref_mask: np.ndarray, n_ref: int) -> float:
    n = int(np.count_nonzero(mask))
    if n + n_ref == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(mask & ref_mask)) / (n + n_ref)


def fit_postprocessing(
    case_ids: Sequence[str],
    load_case: CaseLoader,
    label_ids: Sequence[int],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    use_morphology: bool = True,
    foreground_step: bool = True,
    min_improvement: float = 1e-4,
    cache_limit_bytes: int = 2 * 1024**3,
    progress: bool = True,
    metric: SelectionMetric | str = SelectionMetric.DICE,
    spacing_of: SpacingLoader | None = None,
    volume_quantiles: Sequence[float] = DEFAULT_VOLUME_QUANTILES,
) -> dict[str, Any]:
    """Search postprocessing rules on cross-validation predictions.

    Args:
        case_ids: cases to use (every one needs a prediction and a reference).
        load_case: ``case_id -> (prediction, reference)``, ``(Z, Y, X)`` maps of original label ids.
        label_ids: all label ids of the plan, background 0 first.
        fractions: component-size fractions to try for ``remove_small``.
        use_morphology: also try opening / closing.
        foreground_step: also try keeping the largest component of all foreground together.
        min_improvement: a step is kept only if it raises the mean Dice by more than this.
        cache_limit_bytes: keep loaded cases in memory up to this size (else they are reloaded per stage).
        progress: tqdm bars.
        metric: what each candidate is scored by (see the module docstring; default Dice).
        spacing_of: each case's voxel spacing (mm); None skips the minimum-volume stage.
        volume_quantiles: quantiles of the reference component volumes tried as minimum volumes (stage 2).

    Returns:
        Rules dict (see :mod:`medseg.postprocessing.operations`) with ``scores`` (mean Dice per label
        before/after, number of cases) and ``candidates`` (every candidate's mean Dice, for inspection).

    Raises:
        ValueError: no cases.
    """
    if not case_ids:
        raise ValueError("no cases to fit postprocessing on")
    label_ids = [int(v) for v in label_ids]
    metric = parse_option(SelectionMetric, metric, "metric")
    lesion = metric != SelectionMetric.DICE
    fg = [v for v in label_ids if v != 0]
    k = len(label_ids)
    lut = np.zeros(max(label_ids) + 1, dtype=np.int64)
    lut[label_ids] = np.arange(k)
    cases = SearchCases(case_ids, load_case, cache_limit_bytes, progress, spacing_of)
    n = len(case_ids)
    rules: dict[str, Any] = {
        "format": RULES_FORMAT,
        "label_ids": label_ids,
        "foreground_largest_component": False,
        "per_label": {},
    }
    candidates: dict[str, Any] = {}

    def fg_mean(per_label: np.ndarray) -> float:
        return float(per_label[1:].mean()) if k > 1 else 1.0

    # stage 1: base scores and the all-foreground largest component
    try_fg = foreground_step and len(fg) > 1
    base = np.zeros(k)
    with_fg = np.zeros(k)
    for pred, ref, _spacing in cases:
        base += _label_scores(pred, ref, lut, label_ids, metric)
        if try_fg:
            m = pred != 0
            seg = pred.copy()
            seg[m & ~keep_components(m, None)] = 0
            with_fg += _label_scores(seg, ref, lut, label_ids, metric)
    base /= n
    current = base.copy()
    if try_fg:
        with_fg /= n
        candidates["foreground_largest_component"] = {"none": fg_mean(base), "largest_component": fg_mean(with_fg)}
        if fg_mean(with_fg) > fg_mean(base) + min_improvement and np.all(with_fg[1:] >= base[1:] - 1e-12):
            rules["foreground_largest_component"] = True
            current = with_fg
    logger.info("postprocessing: unprocessed mean foreground %s %.4f", metric, fg_mean(base))

    # stage 2: minimum component volume per label (mL at each case's spacing)
    if spacing_of is not None:
        fit_min_volume(cases, rules, fg, volume_quantiles, metric, min_improvement, candidates)

    # stage 3: connected components per label (Dice from per-component overlaps, no mask rebuilding)
    comp_steps: list[dict | None] = [None] + [{"op": "remove_small", "fraction": float(f)} for f in fractions]
    comp_steps.append({"op": "largest_component"})
    comp_scores = np.zeros((len(fg), len(comp_steps)))

    def comp_keeps(sizes: np.ndarray) -> Iterator[np.ndarray]:
        for step in comp_steps:
            if step is None:
                keep = sizes > 0
            elif step["op"] == "largest_component":
                keep = np.zeros(sizes.size, dtype=bool)
                keep[int(np.argmax(sizes))] = True
            else:
                keep = sizes >= step["fraction"] * sizes.max()
                keep[0] = False
            yield keep

    for i, _seg, mask, ref_mask, n_ref, _spacing in label_masks(cases, rules, fg):
        comp_scores[i] += component_subset_scores(mask, ref_mask, n_ref, comp_keeps, metric)
    comp_scores /= n
    for i, lab in enumerate(fg):
        scored = candidates.setdefault(str(lab), {})  # "none" stays the score before every per-label step
        for j, step in enumerate(comp_steps):
            scored.setdefault(candidate_name(step), float(comp_scores[i, j]))
        best = best_candidate(comp_scores[i], min_improvement)
        if best and (chosen := comp_steps[best]) is not None:  # index 0, the only None, is never best
            rules["per_label"].setdefault(str(lab), []).append(dict(chosen))

    # stage 4: morphology per label
    if use_morphology:
        morph_steps: list[dict[str, Any]] = [{"op": "opening", "radius": 1}, {"op": "closing", "radius": 1}]
        morph_scores = np.zeros((len(fg), 1 + len(morph_steps)))
        score = (lambda m, r, _n: selection_score(m, r, metric)) if lesion else _mask_dice
        for i, seg, mask, ref_mask, n_ref, _spacing in label_masks(cases, rules, fg):
            morph_scores[i, 0] += score(mask, ref_mask, n_ref)
            for j, step in enumerate(morph_steps, start=1):
                new = morphology(mask, step["op"], step["radius"])
                if step["op"] == "closing":
                    new = mask | (new & (seg == 0))
                morph_scores[i, j] += score(new, ref_mask, n_ref)
        morph_scores /= n
        for i, lab in enumerate(fg):
            candidates[str(lab)].update({s["op"]: float(morph_scores[i, j + 1]) for j, s in enumerate(morph_steps)})
            best = best_candidate(morph_scores[i], min_improvement)
            if best:
                rules["per_label"].setdefault(str(lab), []).append(dict(morph_steps[best - 1]))

    # final check on the chained result: no label may end below its unprocessed Dice
    final = current
    for _ in range(2):
        if not rules["per_label"]:
            break
        final = np.zeros(k)
        for pred, ref, spacing in cases:
            final += _label_scores(apply_postprocessing(pred, rules, spacing), ref, lut, label_ids, metric)
        final /= n
        worse = [lab for i, lab in enumerate(label_ids) if lab != 0 and final[i] < base[i] - 1e-12]
        if not worse:
            break
        for lab in worse:
            logger.info("postprocessing: dropping steps of label %d (chained result worse than none)", lab)
            rules["per_label"].pop(str(lab), None)
    name = str(metric)
    rules["scores"] = {
        "num_cases": n,
        **({"metric": name} if lesion else {}),
        f"{name}_before": {str(lab): float(base[i]) for i, lab in enumerate(label_ids) if lab != 0},
        f"{name}_after": {str(lab): float(final[i]) for i, lab in enumerate(label_ids) if lab != 0},
        f"mean_foreground_{name}_before": fg_mean(base),
        f"mean_foreground_{name}_after": fg_mean(final),
    }
    rules["candidates"] = candidates
    logger.info(
        "postprocessing: mean foreground %s %.4f -> %.4f (%s)",
        name,
        fg_mean(base),
        fg_mean(final),
        describe_rules(rules),
    )
    return rules


def describe_rules(rules: dict[str, Any] | None) -> str:
    """Short human description, e.g. ``"foreground largest component; label 1: largest_component"``."""
    if not rules:
        return "none"
    parts = []
    if rules.get("foreground_largest_component"):
        parts.append("foreground largest component")
    for lab, steps in sorted((rules.get("per_label") or {}).items(), key=lambda kv: int(kv[0])):
        parts.append(f"label {lab}: " + ", ".join(candidate_name(s) for s in steps))
    return "; ".join(parts) or "none"
