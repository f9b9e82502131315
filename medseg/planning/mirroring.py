"""Which patch axes to mirror: leave out the axes along which the classes have a fixed order.

nnU-Net mirrors every axis, in training and in test-time augmentation. That is harmless for a structure
that looks alike mirrored, but where two foreground classes always lie in the same order along an axis
(the anterior hippocampus in front of the posterior one, the left kidney on one side of the right one, the
liver above the bladder) a mirrored sample shows an anatomy that never occurs, with its labels swapped
in position: the network must learn to tell the classes apart by shape alone, which a long schedule can
afford and a short one cannot, and mirror TTA then averages in predictions of those impossible images.

Rule (:func:`plan_mirror_axes`): for every array axis and every pair of foreground classes present
together in some cases, compare the centres of mass of the two classes in each such case (fingerprint
``class_centroids``, in mm). An axis is *ordered*, and is not mirrored, only when for some pair all three
hold:

1. **significance**: a two-sided sign test of "either class comes first with probability 1/2" gives
   ``p * m <= ALPHA`` (Bonferroni over the ``m`` pair x axis tests that had data; a tie counts against
   the order). With ``m = 3`` (two classes, 3D) this needs at least 10 cases even at 100 % agreement; a
   4-class tumour set (6 pairs, ``m = 18``) needs 12. Orderings that a handful of cases shows by chance
   are therefore never trusted;
2. **consistency**: the same class comes first in at least :data:`ORDER_CONSISTENCY` of the cases;
3. **anatomical size**: the median offset is at least :data:`MIN_EFFECT` robust standard deviations
   (1.4826 x MAD) of the offsets and at least one voxel of the median spacing along the axis.

Datasets with a single foreground class, too few cases, or classes without a fixed order keep every axis,
as nnU-Net does. Hippocampus (200 cases) keeps X only: the anterior part lies 7.2 mm (3.7 robust SD)
before the posterior along Z and 18.2 mm (11 SD) after it along Y in every case; along X the order holds
in 92 % of cases with 2.1 mm (1.7 SD), so X is mirrored.

The comparison is in the index order of the stored arrays, the order the network sees: data whose
orientation varies between cases show no fixed order and keep mirroring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

from medseg.fingerprint import Fingerprint

#: Family-wise error rate of the sign tests (Bonferroni over every pair x axis tested).
ALPHA = 0.01
#: Fraction of the cases that must show the same order for the axis to count as ordered.
ORDER_CONSISTENCY = 0.95
#: The median offset must be this many robust standard deviations of the offsets.
MIN_EFFECT = 2.0


def sign_test_p(agree: int, cases: int) -> float:
    """Two-sided sign-test p-value: ``agree`` of ``cases`` in one order when either order has probability 1/2.

    Ties are counted among ``cases`` but not in ``agree`` (they count against the order).
    """
    if cases <= 0:
        return 1.0
    k = max(agree, cases - agree)
    return min(1.0, 2.0 * float(binom.sf(k - 1, cases, 0.5)))


@dataclass(frozen=True)
class AxisOrder:
    """Evidence that array ``axis`` has a fixed class order.

    Attributes:
        axis: array axis ``(Z, Y, X)`` of the images (``(Y, X)`` for 2D images).
        first / second: label ids; ``first`` has the lower index along ``axis`` in most cases.
        cases: cases in which both classes are present.
        consistency: fraction of those cases in which ``first`` comes first.
        median_offset_mm: median distance of the centres along ``axis`` (``second`` minus ``first``), mm.
        effect: ``median_offset_mm`` in robust standard deviations of the offsets (inf when they agree).
        p_corrected: sign-test p-value times the number of pair x axis tests (capped at 1).
        tests: that number of tests.
        ordered: whether the evidence passes all three conditions of the rule.
    """

    axis: int
    first: int
    second: int
    cases: int
    consistency: float
    median_offset_mm: float
    effect: float = math.inf
    p_corrected: float = 0.0
    tests: int = 1
    ordered: bool = True

    def to_dict(self, label_names: dict[int, str] | None = None) -> dict[str, Any]:
        names = label_names or {}
        return {
            "order": f"{names.get(self.first, self.first)} before {names.get(self.second, self.second)}",
            "label_ids": [self.first, self.second],
            "cases": self.cases,
            "consistency": round(self.consistency, 4),
            "median_offset_mm": round(self.median_offset_mm, 3),
            "effect_sd": round(self.effect, 2) if math.isfinite(self.effect) else None,  # None: no spread
            "sign_test_p_bonferroni": float(f"{self.p_corrected:.3g}"),
            "tests": self.tests,
        }


def order_evidence(
    fp: Fingerprint, alpha: float = ALPHA, consistency: float = ORDER_CONSISTENCY, min_effect: float = MIN_EFFECT
) -> dict[int, AxisOrder]:
    """The strongest class-order evidence along each array axis, whether or not it passes the rule.

    Args:
        fp: fingerprint with per-case ``class_centroids``.
        alpha: family-wise error rate of the sign tests.
        consistency: fraction of cases that must agree.
        min_effect: median offset in robust standard deviations that the order must reach.

    Returns:
        axis -> the pair with the strongest evidence along it (ordered ones first, then the smallest
        corrected p-value, then more cases). Axes along which no pair co-occurs are absent.
    """
    ids = sorted({i for c in fp.cases for i in c.class_centroids})
    ndim = fp.ndim
    if len(ids) < 2:
        return {}
    index = {cid: k for k, cid in enumerate(ids)}
    centres = np.full((fp.num_cases, len(ids), ndim), np.nan)
    spacings = []
    for n, case in enumerate(fp.cases):
        if len(case.spacing) != ndim:
            continue
        spacing = np.asarray(case.spacing, dtype=np.float64)
        spacings.append(spacing)
        for cid, c in case.class_centroids.items():
            if len(c) == ndim:
                centres[n, index[cid]] = np.asarray(c, dtype=np.float64) * spacing  # mm along each axis
    if not spacings:
        return {}
    voxel_mm = np.median(np.stack(spacings), axis=0)
    candidates = []
    for i in range(len(ids) - 1):
        diff = centres[:, i + 1 :, :] - centres[:, i : i + 1, :]  # (cases, pairs, axes): second - first, mm
        n = (~np.isnan(diff)).sum(axis=0)
        signed = np.nan_to_num(diff)  # absent pairs count as neither order
        pos = (signed > 0).sum(axis=0)
        neg = (signed < 0).sum(axis=0)
        for p, axis in np.argwhere(n > 0):
            d = diff[:, p, axis]
            d = d[~np.isnan(d)]
            median = float(np.median(d))
            spread = 1.4826 * float(np.median(np.abs(d - median)))
            agree = int(max(pos[p, axis], neg[p, axis]))
            j = i + 1 + int(p)
            first, second = (ids[i], ids[j]) if median >= 0 else (ids[j], ids[i])
            effect = abs(median) / spread if spread > 0 else (math.inf if median != 0 else 0.0)
            candidates.append(
                (
                    int(axis),
                    first,
                    second,
                    int(n[p, axis]),
                    agree / int(n[p, axis]),
                    abs(median),
                    effect,
                    sign_test_p(agree, int(n[p, axis])),
                )
            )
    tests = len(candidates)
    best: dict[int, AxisOrder] = {}
    for axis, first, second, cases, frac, offset, effect, p_value in candidates:
        p_corr = min(1.0, p_value * tests)
        ordered = p_corr <= alpha and frac >= consistency and effect >= min_effect and offset >= voxel_mm[axis]
        cand = AxisOrder(axis, first, second, cases, frac, offset, effect, p_corr, tests, ordered)
        old = best.get(axis)
        if old is None or (cand.ordered, -cand.p_corrected, cand.cases, cand.median_offset_mm) > (
            old.ordered,
            -old.p_corrected,
            old.cases,
            old.median_offset_mm,
        ):
            best[axis] = cand
    return best


def ordered_axes(
    fp: Fingerprint, alpha: float = ALPHA, consistency: float = ORDER_CONSISTENCY, min_effect: float = MIN_EFFECT
) -> dict[int, AxisOrder]:
    """Array axes with an established class order, each with its strongest evidence (see the module rule)."""
    return {a: o for a, o in order_evidence(fp, alpha, consistency, min_effect).items() if o.ordered}


def plan_mirror_axes(
    fp: Fingerprint, patch_axes: Sequence[int], label_names: dict[int, str] | None = None
) -> tuple[tuple[int, ...], dict[str, Any]]:
    """Patch axes to mirror for one configuration, and the reasoning for ``plans.json``.

    Args:
        fp: the dataset fingerprint.
        patch_axes: for each patch axis, the array axis of the images it runs along (3D configuration of
            3D images: ``(0, 1, 2)``; 2D configuration slicing along Z: ``(1, 2)``; 2D images: ``(0, 1)``).
        label_names: label id -> name, for the notes.

    Returns:
        ``(mirror_axes, notes)``: the patch axes that are mirrored, ascending.
    """
    evidence = order_evidence(fp)
    orders = {a: o for a, o in evidence.items() if o.ordered}
    keep = tuple(p for p, a in enumerate(patch_axes) if a not in orders)
    notes: dict[str, Any] = {"mirror_axes": list(keep)}
    fixed = {str(p): orders[a].to_dict(label_names) for p, a in enumerate(patch_axes) if a in orders}
    if fixed:
        notes["not_mirrored"] = fixed
    weak = {
        str(p): evidence[a].to_dict(label_names) for p, a in enumerate(patch_axes) if a in evidence and a not in orders
    }
    if weak:
        notes["order_not_established"] = weak
    return keep, notes


RULE = (
    "a patch axis is not mirrored (in training or TTA) only when two foreground classes lie in the same "
    f"order along it (centres of mass, array index order) with sign-test p x tests <= {ALPHA} (Bonferroni "
    f"over pair x axis tests), in >= {ORDER_CONSISTENCY:.0%} of the cases, and with a median offset of "
    f">= {MIN_EFFECT:g} robust SD and >= 1 voxel; otherwise every axis is mirrored, as in nnU-Net"
)
