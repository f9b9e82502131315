"""A case on the networks' grids and back: its preprocessing per configuration, and the members'
probabilities mapped onto the original grid and combined.

Each configuration's mean probabilities ``(K, z, y, x)`` on its preprocessed grid are mapped back onto the
original grid (resampled, uncropped: background probability 1 outside the crop, 0 for region plans) and
averaged over configurations, each weighted by its number of members: the mean over all members.
Probabilities of a streamed case live on a memory-mapped scratch file (:mod:`medseg.inference.scratch`);
the pages each step read are given back after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medseg.inference.scratch import release_pages
from medseg.io.image import ImageGeometry
from medseg.planning.plan import Plan
from medseg.preprocessing import revert_to_original
from medseg.preprocessing.regions import probabilities_to_classes

#: Per configuration: (mean probabilities ``(K, z, y, x)`` on its preprocessed grid, its CaseProperties, members).
Inferred = list[tuple[np.ndarray, Any, int]]


@dataclass
class PreparedCase:
    """A case preprocessed for every configuration of the ensemble."""

    case_id: str
    geometry: ImageGeometry
    per_config: dict[str, tuple[np.ndarray, Any]]  # config -> (data (C,z,y,x), CaseProperties)
    previous: dict[str, PreparedCase] = field(default_factory=dict)  # previous stage -> its preparation


def combine_probabilities(inferred: Inferred, plan: Plan) -> np.ndarray:
    """Mean probabilities ``(K, Z, Y, X)`` over all members, on the original grid."""
    total: np.ndarray | None = None
    count = 0
    for probs, props, n in inferred:
        orig = revert_to_original(probs, props, background_outside=not plan.is_region_based)
        release_pages(probs)
        if total is None:
            total = orig * n if n != 1 else orig
        else:
            total += orig * n
        count += n
    assert total is not None
    if count != 1:
        total /= count
    return total


def combine_classes(inferred: Inferred, plan: Plan) -> np.ndarray:
    """Argmax of the mean probabilities on the original grid, one class at a time.

    Equal to ``combine_probabilities(inferred, plan).argmax(0)`` but holds ~3 original-grid volumes instead
    of ``K`` (matters for many classes on large scans). Returns ``(Z, Y, X)`` class indices.
    """
    if plan.is_region_based:  # thresholds need the mean of every region: no one-class-at-a-time argmax
        return probabilities_to_classes(combine_probabilities(inferred, plan), plan)
    best: np.ndarray | None = None
    arg: np.ndarray | None = None
    for k in range(plan.num_classes):
        acc, _ = _weighted_class_sum(inferred, k)
        if best is None or arg is None:
            best = acc
            arg = np.zeros(acc.shape, dtype=np.uint8 if plan.num_classes <= 256 else np.int32)
        else:
            better = acc > best
            arg[better] = k
            np.maximum(best, acc, out=best)
    assert arg is not None
    return arg


def class_probability(inferred: Inferred, plan: Plan, k: int) -> np.ndarray:
    """Mean probability of class index ``k`` over all members on the original grid: float32 ``(Z, Y, X)``.

    Equal to ``combine_probabilities(inferred, plan)[k]`` but builds one class's volume only. Not for region
    plans (their channels are regions, not classes).
    """
    acc, count = _weighted_class_sum(inferred, k)
    if count != 1:
        acc /= count
    return acc.astype(np.float32, copy=False)


def _weighted_class_sum(inferred: Inferred, k: int) -> tuple[np.ndarray, int]:
    """Sum over members of class ``k``'s probability on the original grid, each weighted by its count ``n``;
    with the total count (the sum divided by it is the mean)."""
    acc: np.ndarray | None = None
    count = 0
    for probs, props, n in inferred:
        p = revert_to_original(probs[k : k + 1], props)[0]  # a new array
        release_pages(probs)  # a streamed case's probabilities: give back the pages of class k
        if k > 0:  # revert pads a single channel as if it were background
            _zero_outside(p, props.bbox)
        if n != 1:
            p *= n
        acc = p if acc is None else np.add(acc, p, out=acc)
        count += n
    assert acc is not None
    return acc, count


def _zero_outside(array: np.ndarray, bbox: Sequence[tuple[int, int]]) -> None:
    """Set ``array`` to 0 outside the box ``bbox`` ((start, stop) per axis; a leading Z entry is ignored
    for a 2D array), in place."""
    bbox = list(bbox)[-array.ndim :]
    for axis, (start, stop) in enumerate(bbox):
        index: list[Any] = [slice(None)] * array.ndim
        index[axis] = slice(0, start)
        array[tuple(index)] = 0
        index[axis] = slice(stop, None)
        array[tuple(index)] = 0
