"""Which patch axes to mirror: leave out the axes along which the classes have a fixed order.

nnU-Net mirrors every axis, in training and in test-time augmentation. That is harmless for a structure
that looks alike mirrored, but where two foreground classes always lie in the same order along an axis
(the anterior hippocampus in front of the posterior one, the left kidney on one side of the right one, the
liver above the bladder) a mirrored sample shows an anatomy that never occurs, with its labels swapped
in position: the network must learn to tell the classes apart by shape alone, which a long schedule can
afford and a short one cannot, and mirror TTA then averages in predictions of those impossible images.

Rule (:func:`plan_mirror_axes`): for every array axis and every pair of foreground classes present
together in at least :data:`MIN_CASES` cases, compare the centres of mass of the two classes in each such
case (fingerprint ``class_centroids``). An axis is *ordered* when, for some pair, the same class comes
first in at least :data:`ORDER_CONSISTENCY` of those cases (a tie counts against it). Ordered axes are not
mirrored; the others are. Datasets with a single foreground class, or classes without a fixed order,
keep every axis, as nnU-Net does.

The comparison is in the index order of the stored arrays, the order the network sees: data whose
orientation varies between cases show no fixed order and keep mirroring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.fingerprint import Fingerprint

#: Cases in which both classes of a pair must be present before their order is trusted.
MIN_CASES = 5
#: Fraction of those cases that must show the same order for the axis to count as ordered.
ORDER_CONSISTENCY = 0.95


@dataclass(frozen=True)
class AxisOrder:
    """Evidence that array ``axis`` has a fixed class order.

    Attributes:
        axis: array axis ``(Z, Y, X)`` of the images (``(Y, X)`` for 2D images).
        first / second: label ids; ``first`` has the lower index along ``axis`` in most cases.
        cases: cases in which both classes are present.
        consistency: fraction of those cases in which ``first`` comes first.
        median_offset_mm: median distance of the centres along ``axis`` (``second`` minus ``first``), mm.
    """

    axis: int
    first: int
    second: int
    cases: int
    consistency: float
    median_offset_mm: float

    def to_dict(self, label_names: dict[int, str] | None = None) -> dict[str, Any]:
        names = label_names or {}
        return {
            "order": f"{names.get(self.first, self.first)} before {names.get(self.second, self.second)}",
            "label_ids": [self.first, self.second],
            "cases": self.cases,
            "consistency": round(self.consistency, 4),
            "median_offset_mm": round(self.median_offset_mm, 3),
        }


def ordered_axes(fp: Fingerprint, min_cases: int = MIN_CASES,
                 consistency: float = ORDER_CONSISTENCY) -> dict[int, AxisOrder]:
    """Array axes with a fixed class order, each with its strongest evidence.

    Args:
        fp: fingerprint with per-case ``class_centroids``.
        min_cases: pairs present together in fewer cases are ignored.
        consistency: fraction of cases that must agree.

    Returns:
        axis -> the pair that orders it most consistently (ties: more cases, then larger offset).
    """
    ids = sorted({i for c in fp.cases for i in c.class_centroids})
    ndim = fp.ndim
    if len(ids) < 2 or fp.num_cases < min_cases:
        return {}
    index = {cid: k for k, cid in enumerate(ids)}
    centres = np.full((fp.num_cases, len(ids), ndim), np.nan)
    for n, case in enumerate(fp.cases):
        if len(case.spacing) != ndim:
            continue
        spacing = np.asarray(case.spacing, dtype=np.float64)
        for cid, c in case.class_centroids.items():
            if len(c) == ndim:
                centres[n, index[cid]] = np.asarray(c, dtype=np.float64) * spacing  # mm along each axis
    best: dict[int, AxisOrder] = {}
    for i in range(len(ids) - 1):
        diff = centres[:, i + 1:, :] - centres[:, i:i + 1, :]  # (cases, pairs, axes): second - first, mm
        n = (~np.isnan(diff)).sum(axis=0)
        signed = np.nan_to_num(diff)  # absent pairs count as neither order
        pos = (signed > 0).sum(axis=0)
        neg = (signed < 0).sum(axis=0)
        frac = np.maximum(pos, neg) / np.maximum(n, 1)
        hits = np.argwhere((n >= min_cases) & (frac >= consistency))
        for p, axis in hits:
            j = i + 1 + int(p)
            d = diff[:, p, axis]
            median = float(np.median(d[~np.isnan(d)]))
            first, second = (ids[i], ids[j]) if median >= 0 else (ids[j], ids[i])
            cand = AxisOrder(int(axis), first, second, int(n[p, axis]), float(frac[p, axis]), abs(median))
            old = best.get(int(axis))
            if old is None or (cand.consistency, cand.cases, cand.median_offset_mm) > (
                    old.consistency, old.cases, old.median_offset_mm):
                best[int(axis)] = cand
    return best


def plan_mirror_axes(fp: Fingerprint, patch_axes: Sequence[int],
                     label_names: dict[int, str] | None = None) -> tuple[tuple[int, ...], dict[str, Any]]:
    """Patch axes to mirror for one configuration, and the reasoning for ``plans.json``.

    Args:
        fp: the dataset fingerprint.
        patch_axes: for each patch axis, the array axis of the images it runs along (3D configuration of
            3D images: ``(0, 1, 2)``; 2D configuration slicing along Z: ``(1, 2)``; 2D images: ``(0, 1)``).
        label_names: label id -> name, for the notes.

    Returns:
        ``(mirror_axes, notes)``: the patch axes that are mirrored, ascending.
    """
    orders = ordered_axes(fp)
    keep = tuple(p for p, a in enumerate(patch_axes) if a not in orders)
    notes: dict[str, Any] = {"mirror_axes": list(keep)}
    fixed = {str(p): orders[a].to_dict(label_names) for p, a in enumerate(patch_axes) if a in orders}
    if fixed:
        notes["not_mirrored"] = fixed
    return keep, notes


RULE = (f"a patch axis is not mirrored (in training or TTA) when two foreground classes present together in "
        f">= {MIN_CASES} cases lie in the same order along it in >= {ORDER_CONSISTENCY:.0%} of them "
        "(centres of mass, array index order)")
