"""Postprocessing operations on label maps and the rules format that chains them.

Rules (the content of ``WORK/postprocessing.json``)::

    {
      "format": "medseg-postprocessing-v1",
      "label_ids": [0, 1, 2],
      "foreground_largest_component": false,
      "per_label": {"1": [{"op": "largest_component"}],
                    "2": [{"op": "remove_small", "fraction": 0.2}, {"op": "closing", "radius": 1}],
                    "3": [{"op": "min_volume", "ml": 0.05}]},
      ...   (fit scores and provenance, ignored by apply)
    }

Operations act on one label's mask of a ``(Z, Y, X)`` map of *original label ids*:

- ``largest_component``: keep only the largest connected component.
- ``remove_small``: remove components smaller than ``fraction`` times the largest one.
- ``min_volume``: remove components whose volume is below ``ml`` millilitres (1 mL = 1000 mm^3), measured with
  the case's own voxel spacing, so the rule means the same at any resolution (a 2D map's pixels count as
  1 mm thick). Only this step needs the spacing; applying it without one is a ``ValueError``.
- ``opening`` / ``closing``: binary morphological opening / closing with a face-connected (6-neighbour
  in 3D) structuring element iterated ``radius`` times, in voxels.

Removed voxels become background (0). Closing only claims background voxels, never another label's.
Connected components use full connectivity (26 neighbours in 3D), which keeps diagonally touching parts
together. ``foreground_largest_component`` first keeps the largest component of all foreground labels
taken together (removed voxels -> 0). Order of application: foreground step, then each label in
ascending id order with its steps in list order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.io.image import atomic_write_text, voxel_ml

RULES_FORMAT = "medseg-postprocessing-v1"
OPS = ("largest_component", "remove_small", "min_volume", "opening", "closing")


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    objs = ndimage.find_objects(mask.astype(np.uint8, copy=False))
    if not objs or objs[0] is None:
        return None
    return tuple(slice(max(0, s.start - margin), min(n, s.stop + margin)) for s, n in zip(objs[0], mask.shape))


def label_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a boolean mask (full connectivity).

    Returns:
        ``(components, sizes)``: int32 component map (0 = outside the mask, 1..n) and int64 voxel
        counts indexed by component id (``sizes[0]`` = 0).
    """
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    comps, n = ndimage.label(mask, structure=structure)
    sizes = np.bincount(comps.ravel(), minlength=n + 1).astype(np.int64)
    sizes[0] = 0
    return comps, sizes


def keep_components(mask: np.ndarray, min_fraction: float | None) -> np.ndarray:
    """Boolean mask keeping the largest component (``min_fraction`` None) or every component of at
    least ``min_fraction`` x the largest one's size."""
    if not mask.any():
        return mask.copy()
    comps, sizes = label_components(mask)
    if min_fraction is None:
        keep_ids = np.zeros(sizes.shape, dtype=bool)
        keep_ids[int(np.argmax(sizes))] = True
    else:
        keep_ids = sizes >= min_fraction * sizes.max()
        keep_ids[0] = False
    return keep_ids[comps]


def remove_below_volume(mask: np.ndarray, min_ml: float, spacing: Sequence[float]) -> np.ndarray:
    """Boolean mask without the components (full connectivity) of fewer than ``min_ml`` millilitres.

    Args:
        mask: boolean ``(Z, Y, X)`` (or 2D) mask.
        min_ml: smallest volume kept, mL; a component of exactly this volume stays.
        spacing: voxel size in mm per axis of ``mask``.

    Raises:
        ValueError: ``spacing`` does not have one value per axis of ``mask``.
    """
    if len(spacing) != mask.ndim:
        raise ValueError(f"spacing {list(spacing)} does not fit a {mask.ndim}D mask")
    if not mask.any():
        return mask.copy()
    comps, sizes = label_components(mask)
    keep = sizes * voxel_ml(spacing) >= min_ml
    keep[0] = False
    return keep[comps]


def morphology(mask: np.ndarray, op: str, radius: int = 1) -> np.ndarray:
    """Binary opening or closing of ``mask`` (cropped to its bounding box plus a margin for speed)."""
    box = _bbox(mask, margin=2 * radius + 1)
    out = mask.copy()
    if box is None:
        return out
    sub = mask[box]
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    if op == "opening":
        res = ndimage.binary_opening(sub, structure=structure, iterations=radius)
    elif op == "closing":
        res = ndimage.binary_closing(sub, structure=structure, iterations=radius)
    else:
        raise ValueError(f"unknown morphology {op!r}")
    out[box] = res
    return out


def apply_step(seg: np.ndarray, label: int, step: Mapping[str, Any], spacing: Sequence[float] | None = None) -> None:
    """Apply one step to label ``label`` of ``seg`` in place (see the module docstring).

    Raises:
        MedsegError: an unknown operation.
        ValueError: a ``min_volume`` step without ``spacing`` (mm per axis of ``seg``).
    """
    op = step.get("op")
    mask = seg == label
    if op == "largest_component":
        new = keep_components(mask, None)
    elif op == "remove_small":
        new = keep_components(mask, float(step["fraction"]))
    elif op == "min_volume":
        if spacing is None:
            raise ValueError("the min_volume postprocessing step needs the voxel spacing of the label map")
        new = remove_below_volume(mask, float(step["ml"]), spacing)
    elif op in ("opening", "closing"):
        new = morphology(mask, op, int(step.get("radius", 1)))
    else:
        raise MedsegError(f"unknown postprocessing operation {op!r}; known: {list(OPS)}")
    if op == "closing":  # only adds voxels, and only where there is background
        seg[new & ~mask & (seg == 0)] = label
    else:
        seg[mask & ~new] = 0


def apply_postprocessing(
    seg_ids: np.ndarray, rules: Mapping[str, Any] | None, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Apply postprocessing rules to a label map.

    Args:
        seg_ids: ``(Z, Y, X)`` (or any-D) integer map of original label ids.
        rules: a rules dict (see module docstring), or None for no change.
        spacing: voxel size in mm per axis of ``seg_ids``; needed by ``min_volume`` steps only.

    Returns:
        A new array of the same shape and dtype.

    Raises:
        ValueError: the rules hold a ``min_volume`` step and ``spacing`` is None.
    """
    seg = np.array(seg_ids, copy=True)
    if not rules:
        return seg
    if rules.get("foreground_largest_component"):
        fg = seg != 0
        seg[fg & ~keep_components(fg, None)] = 0
    per_label = rules.get("per_label", {}) or {}
    for label in sorted(per_label, key=int):
        for step in per_label[label]:
            apply_step(seg, int(label), step, spacing)
    return seg


def _number(value: Any) -> float:
    """``value`` as a float, NaN when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def save_rules(rules: Mapping[str, Any], path: str | Path) -> None:
    """Write rules as JSON atomically."""
    atomic_write_text(path, json.dumps(rules, indent=2) + "\n")


def load_rules(path: str | Path) -> dict[str, Any]:
    """Read and check a rules file.

    Raises:
        MedsegError: missing file, invalid JSON, wrong format or unknown operation.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"{path}: postprocessing file not found")
    try:
        rules = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedsegError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(rules, dict) or rules.get("format") != RULES_FORMAT:
        raise MedsegError(f"{path}: not a medseg postprocessing file (expected format {RULES_FORMAT!r})")
    for label, steps in (rules.get("per_label") or {}).items():
        for step in steps:
            if step.get("op") not in OPS:
                raise MedsegError(f"{path}: label {label}: unknown operation {step.get('op')!r}; known: {list(OPS)}")
            if step["op"] == "remove_small" and not 0 < float(step.get("fraction", -1)) <= 1:
                raise MedsegError(f"{path}: label {label}: remove_small needs 0 < fraction <= 1")
            if step["op"] == "min_volume" and not 0 <= _number(step.get("ml")) < math.inf:
                raise MedsegError(f"{path}: label {label}: min_volume needs a volume ml >= 0 (mL)")
    return rules


@dataclass(frozen=True)
class RulesPostprocess:
    """Rules as the callable a :class:`~medseg.inference.predictor.Predictor` applies to each label map.

    Attributes:
        rules: the rules dict (the format of this module).
    """

    rules: Mapping[str, Any]

    def __call__(self, seg_ids: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """:func:`apply_postprocessing` of a ``(Z, Y, X)`` map of original label ids of voxel size ``spacing``
        (mm, same axis order) (a new array)."""
        return apply_postprocessing(seg_ids, self.rules, spacing)
