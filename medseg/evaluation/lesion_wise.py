"""Lesion-wise (instance) metrics of binary masks: every lesion counted, as lesion and tumour studies report.

A *lesion* is a connected component of one class's mask (``scipy.ndimage.label``). Connectivity is
``connectivity`` in 1..ndim (1 = faces, 6 neighbours in 3D; ndim = faces, edges and corners, 26 in 3D);
the default is full connectivity, as the BraTS 2023 evaluation (26-connected) and medseg's
postprocessing use, so diagonally touching voxels stay one lesion.

Matching of predicted to reference lesions (:class:`~medseg.options.LesionMatching`):

- ``iou`` (default): one-to-one. Pairs of a reference and a predicted lesion that overlap with
  IoU >= ``iou_threshold`` (default 0.5) are candidates; the assignment maximising the summed IoU of the
  candidates is taken (Hungarian matching, ``scipy.optimize.linear_sum_assignment``). Matched pairs are
  true positives (tp); unmatched predicted lesions are false positives (fp), unmatched reference
  lesions false negatives (fn). Above 0.5 a lesion can reach the threshold with one partner only, so the
  matching is unique; panoptica's ``MaxBipartiteMatching`` gives the same pairs (docs/evaluation.md).
- ``brats``: the BraTS 2023 rule. Reference lesions closer to each other than the dilation reach are one
  lesion (the reference voxels of one connected component of the dilated reference). Each reference
  lesion is dilated (``brats_dilation`` iterations, default 3, of the 18-neighbour 3D structure /
  8-neighbour 2D structure); every predicted lesion that overlaps the dilated lesion counts toward it,
  and the lesion's prediction is the union of those predicted lesions (one predicted lesion may count
  toward several reference lesions). A reference
  lesion with at least one such predicted lesion is a tp, one without is a fn; a predicted lesion that
  overlaps no dilated reference lesion is a fp. Dice, IoU and HD95 of a tp are those of the (undilated)
  reference lesion against the union.

Scores of one case and class (``n = tp + fp + fn``):

- ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``, ``f1 = 2 tp / (2 tp + fp + fn)`` (detection).
- ``lesion_dice = sum of the tp Dice / n`` and ``lesion_hd95 = (sum of the tp HD95 + (fp + fn) x the
  image diagonal in mm) / n`` (BraTS 2023: a missed or false lesion scores Dice 0 and HD95 = the
  diagonal). HD95 per lesion is that of :mod:`medseg.evaluation.metrics` (the larger directed 95th
  percentile, mm, anisotropic spacing exact).
- ``pq = sq x rq`` (panoptic quality, Kirillov et al. 2019): ``sq`` = mean IoU of the tp, ``rq`` = f1.

Conventions for empty cases: no reference and no predicted lesion (n = 0) is a correct prediction:
precision = recall = f1 = lesion_dice = pq = 1, lesion_hd95 = 0, tp = fp = fn = 0. A ratio whose
denominator is 0 in a case with errors is 0 (no reference lesion but a false one: recall 0; reference
lesions but no predicted lesion: precision 0), as medseg's voxel Dice gives 0 when one mask is empty.

Minimum lesion volume (``min_volume_ml``, off = 0: every reference lesion counts): reference lesions smaller
than it are left out (neither tp nor fn), and so are the predicted lesions that were matched to them or,
unmatched, overlap them (``iou``) / count toward them (``brats``); every other predicted lesion counts,
however small, as in the BraTS 2023 evaluation (which drops reference lesions of at most its threshold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from medseg.evaluation.metrics import hd95_and_surface_dice
from medseg.io.image import voxel_ml
from medseg.options import LesionMatching, SelectionMetric, parse_option

#: The keys of a ``"lesion_wise"`` object in the metrics JSON, in order.
LESION_KEYS = ("tp", "fp", "fn", "precision", "recall", "f1", "lesion_dice", "lesion_hd95", "pq")
COUNT_KEYS = ("tp", "fp", "fn")


@dataclass(frozen=True)
class LesionWiseOptions:
    """How lesions are found and matched (see the module docstring).

    Attributes:
        matching: ``iou`` (one-to-one Hungarian on IoU) or ``brats`` (dilated-reference overlap).
        iou_threshold: least IoU of a matched pair (``iou`` matching).
        connectivity: 1..ndim neighbourhood of a lesion's voxels; None = ndim (full).
        min_volume_ml: reference lesions smaller than this (mL) are left out, with the predicted lesions
            that belong to them (see the module docstring); 0 = every reference lesion counts.
        brats_dilation: dilation iterations of a reference lesion (``brats`` matching), voxels.
    """

    matching: LesionMatching = LesionMatching.IOU
    iou_threshold: float = 0.5
    connectivity: int | None = None
    min_volume_ml: float = 0.0
    brats_dilation: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "matching", parse_option(LesionMatching, self.matching, "lesion matching"))
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {self.iou_threshold}")
        if self.min_volume_ml < 0:
            raise ValueError(f"min_volume_ml must be >= 0, got {self.min_volume_ml}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (recorded in the metrics JSON)."""
        out = asdict(self)
        out["matching"] = str(self.matching)
        return out


@dataclass(frozen=True)
class LesionWiseScores:
    """Lesion-wise scores of one case and class (definitions in the module docstring)."""

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    lesion_dice: float
    lesion_hd95: float
    pq: float

    def to_dict(self) -> dict[str, Any]:
        """``{key: value}`` with exactly :data:`LESION_KEYS` (``lesion_hd95`` is NaN when not computed)."""
        return {k: getattr(self, k) for k in LESION_KEYS}


def label_lesions(
    mask: np.ndarray, spacing: Sequence[float], connectivity: int | None = None, min_volume_ml: float = 0.0
) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask, numbered 1..n, without those below ``min_volume_ml``.

    Args:
        mask: boolean ``(Z, Y, X)`` (or 2D) mask.
        spacing: voxel size in mm per axis.
        connectivity: 1..ndim (None = ndim).
        min_volume_ml: components of a smaller volume (mL = 1000 mm^3) are removed.

    Returns:
        ``(components, n)``: int32 map (0 = no lesion) and the number of lesions.
    """
    conn = mask.ndim if connectivity is None else int(connectivity)
    if not 1 <= conn <= mask.ndim:
        raise ValueError(f"connectivity must be in 1..{mask.ndim}, got {connectivity}")
    comps, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, conn))
    comps = comps.astype(np.int32, copy=False)
    if n and min_volume_ml > 0:
        sizes = np.bincount(comps.ravel(), minlength=n + 1)
        keep = sizes * voxel_ml(spacing) >= min_volume_ml
        keep[0] = False
        new_ids = np.zeros(n + 1, dtype=np.int32)
        new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        comps, n = new_ids[comps], int(keep.sum())
    return comps, int(n)


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image's diagonal in mm (the HD95 of a missed or false lesion)."""
    return float(math.sqrt(sum((n * float(s)) ** 2 for n, s in zip(shape, spacing))))


def _overlaps(ref_c: np.ndarray, pred_c: np.ndarray, n_pred: int) -> dict[tuple[int, int], int]:
    """``{(reference id, predicted id): overlapping voxels}`` for every overlapping pair."""
    both = (ref_c > 0) & (pred_c > 0)
    keys, counts = np.unique(ref_c[both].astype(np.int64) * (n_pred + 1) + pred_c[both], return_counts=True)
    return {(int(k) // (n_pred + 1), int(k) % (n_pred + 1)): int(c) for k, c in zip(keys, counts)}


def _box_union(boxes: Sequence[tuple[slice, ...]], shape: Sequence[int]) -> tuple[slice, ...]:
    """The bounding box of several boxes, one voxel larger on each side (inside the image)."""
    return tuple(
        slice(max(0, min(b[a].start for b in boxes) - 1), min(shape[a], max(b[a].stop for b in boxes) + 1))
        for a in range(len(shape))
    )


def _iou_matches(overlap: dict[tuple[int, int], int], ref_sz: np.ndarray, pred_sz: np.ndarray, thr: float) -> list:
    """One-to-one matches ``[(reference id, [predicted id])]`` maximising the summed IoU (IoU >= thr)."""
    cand = {}
    for (r, p), inter in overlap.items():
        iou = inter / (ref_sz[r] + pred_sz[p] - inter)
        if iou >= thr:
            cand[(r, p)] = iou
    if not cand:
        return []
    rows = sorted({r for r, _ in cand})
    cols = sorted({p for _, p in cand})
    ri, ci = {r: i for i, r in enumerate(rows)}, {p: j for j, p in enumerate(cols)}
    gain = np.zeros((len(rows), len(cols)))
    for (r, p), iou in cand.items():
        gain[ri[r], ci[p]] = iou
    a, b = linear_sum_assignment(gain, maximize=True)
    return [(rows[i], [cols[j]]) for i, j in zip(a, b) if (rows[i], cols[j]) in cand]


def _brats_reference_lesions(ref: np.ndarray, dilation: int) -> tuple[np.ndarray, int]:
    """BraTS 2023 reference lesions: the reference voxels of each connected component of the dilated
    reference (lesions closer than the dilation reach are one lesion)."""
    structure = ndimage.generate_binary_structure(ref.ndim, min(2, ref.ndim))
    grown = ndimage.binary_dilation(ref, structure=structure, iterations=dilation) if dilation > 0 else ref
    groups, n = ndimage.label(grown, structure=ndimage.generate_binary_structure(ref.ndim, ref.ndim))
    return np.where(ref, groups, 0).astype(np.int32), int(n)


def _brats_matches(ref_c: np.ndarray, pred_c: np.ndarray, n_ref: int, dilation: int) -> list:
    """``[(reference id, [predicted ids overlapping the dilated reference lesion])]`` for detected lesions."""
    structure = ndimage.generate_binary_structure(ref_c.ndim, min(2, ref_c.ndim))
    out = []
    for r, box in enumerate(ndimage.find_objects(ref_c, max_label=n_ref), start=1):
        if box is None:
            continue
        grown = tuple(slice(max(0, s.start - dilation), min(n, s.stop + dilation)) for s, n in zip(box, ref_c.shape))
        dilated = ref_c[grown] == r
        if dilation > 0:
            dilated = ndimage.binary_dilation(dilated, structure=structure, iterations=dilation)
        hits = [int(p) for p in np.unique(pred_c[grown][dilated]) if p]
        if hits:
            out.append((r, hits))
    return out


def lesion_wise_scores(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    options: LesionWiseOptions | None = None,
    hd95: bool = True,
) -> LesionWiseScores:
    """Lesion-wise scores of one binary prediction against one binary reference.

    Args:
        pred, ref: boolean masks of one class, same shape ``(Z, Y, X)`` (or 2D).
        spacing: voxel size in mm per axis.
        options: matching, connectivity, minimum volume (default :class:`LesionWiseOptions`).
        hd95: compute ``lesion_hd95`` (else NaN; the slow part).

    Returns:
        :class:`LesionWiseScores` (definitions and empty-case conventions in the module docstring).
    """
    opts = options or LesionWiseOptions()
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    brats = opts.matching == LesionMatching.BRATS
    if brats:
        ref_c, n_ref = _brats_reference_lesions(ref.astype(bool), opts.brats_dilation)
    else:
        ref_c, n_ref = label_lesions(ref.astype(bool), spacing, opts.connectivity)
    pred_c, n_pred = label_lesions(pred.astype(bool), spacing, opts.connectivity)
    ref_sz = np.bincount(ref_c.ravel(), minlength=n_ref + 1)
    pred_sz = np.bincount(pred_c.ravel(), minlength=n_pred + 1)
    small = ref_sz * voxel_ml(spacing) < opts.min_volume_ml  # reference lesions left out
    small[0] = False
    overlap = _overlaps(ref_c, pred_c, n_pred)
    if brats:
        found = _brats_matches(ref_c, pred_c, n_ref, opts.brats_dilation)
        used = {p for _, ps in found for p in ps}  # counting toward a left-out lesion is no fp either
    else:
        found = _iou_matches(overlap, ref_sz, pred_sz, opts.iou_threshold)
        used = {p for r, ps in found if not small[r] for p in ps}
        ignored = {p for (r, p) in overlap if small[r]} - used
        used |= ignored
    matches = [(r, ps) for r, ps in found if not small[r]]
    tp, fn, fp = len(matches), n_ref - int(small.sum()) - len(matches), n_pred - len(used)
    diagonal = image_diagonal_mm(ref.shape, spacing)
    ref_boxes = ndimage.find_objects(ref_c, max_label=n_ref) if hd95 and matches else []
    pred_boxes = ndimage.find_objects(pred_c, max_label=n_pred) if hd95 and matches else []
    dice_sum = iou_sum = hd_sum = 0.0
    for r, ps in matches:
        inter = sum(overlap.get((r, p), 0) for p in ps)
        size = int(pred_sz[ps].sum())
        dice_sum += 2.0 * inter / (ref_sz[r] + size)
        iou_sum += inter / (ref_sz[r] + size - inter)
        if hd95:
            box = _box_union([ref_boxes[r - 1], *(pred_boxes[p - 1] for p in ps)], ref.shape)
            hd, _ = hd95_and_surface_dice(np.isin(pred_c[box], ps), ref_c[box] == r, spacing)
            hd_sum += hd
    n = tp + fp + fn
    if n == 0:
        return LesionWiseScores(0, 0, 0, 1.0, 1.0, 1.0, 1.0, 0.0 if hd95 else math.nan, 1.0)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2.0 * tp / (2 * tp + fp + fn)
    sq = iou_sum / tp if tp else 0.0
    lesion_hd95 = (hd_sum + (fp + fn) * diagonal) / n if hd95 else math.nan
    return LesionWiseScores(
        tp, fp, fn, float(precision), float(recall), float(f1), float(dice_sum / n), float(lesion_hd95), float(sq * f1)
    )


def lesion_wise_case(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    label_ids: Sequence[int],
    options: LesionWiseOptions | None = None,
) -> dict[int, dict[str, Any]]:
    """Lesion-wise scores of each label of one case: ``{label: {LESION_KEYS...}}``.

    Args:
        pred, ref: integer label maps ``(Z, Y, X)`` of original label ids, same shape.
        spacing: voxel size in mm, ``(Z, Y, X)``.
        label_ids: labels to evaluate.
        options: see :class:`LesionWiseOptions`.
    """
    return {int(lab): lesion_wise_scores(pred == lab, ref == lab, spacing, options).to_dict() for lab in label_ids}


def mean_lesion_wise(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate ``"lesion_wise"`` objects: tp, fp and fn summed, the other keys averaged.

    Averages skip None/NaN values (a ``lesion_hd95`` not computed); a key without values is None.
    """
    out: dict[str, Any] = {}
    for k in LESION_KEYS:
        if k in COUNT_KEYS:
            out[k] = int(sum(int(e[k]) for e in entries))
            continue
        vals = [float(e[k]) for e in entries if e[k] is not None and math.isfinite(float(e[k]))]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def lesion_summary(lw: dict[str, Any], matching: str) -> str:
    """Human fragment of a mean ``"lesion_wise"`` object, e.g. ``"lesion-wise (iou matching): 3 TP, ..."``."""
    hd = f"{lw['lesion_hd95']:.2f} mm" if lw.get("lesion_hd95") is not None else "n/a"
    return (
        f"lesion-wise ({matching} matching): {lw['tp']} TP, {lw['fp']} FP, {lw['fn']} FN, F1 {lw['f1']:.4f}, "
        f"lesion Dice {lw['lesion_dice']:.4f}, lesion HD95 {hd}, PQ {lw['pq']:.4f}"
    )


def csv_number(v: Any) -> str:
    """A count as an integer, a score with 6 decimals, None/NaN/inf as an empty CSV cell."""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return "" if v is None or not math.isfinite(v) else f"{v:.6f}"


def selection_score(
    pred: np.ndarray,
    ref: np.ndarray,
    metric: SelectionMetric | str,
    spacing: Sequence[float] | None = None,
    options: LesionWiseOptions | None = None,
) -> float:
    """One lesion-wise number of one class (``lesion_f1``, ``lesion_dice`` or ``pq``) for ranking.

    Args:
        pred, ref: boolean masks of one class, same shape.
        metric: a lesion-wise :class:`~medseg.options.SelectionMetric` (not ``dice``).
        spacing: voxel size in mm (only the minimum volume uses it; default 1 mm).
        options: see :class:`LesionWiseOptions`.

    Raises:
        ValueError: ``metric`` is ``dice`` (not lesion-wise).
    """
    m = parse_option(SelectionMetric, metric, "metric")
    if m == SelectionMetric.DICE:
        raise ValueError("selection_score computes lesion-wise metrics only")
    s = lesion_wise_scores(pred, ref, spacing or (1.0,) * pred.ndim, options, hd95=False)
    return {SelectionMetric.LESION_F1: s.f1, SelectionMetric.LESION_DICE: s.lesion_dice, SelectionMetric.PQ: s.pq}[m]
