"""Region-based labels in ``dataset.json`` (nnU-Net v2 semantics).

A region is a set of label ids; a voxel belongs to region ``r`` when its label id is in that set, so
regions may overlap (BraTS: ``"whole": [1, 2, 3], "core": [2, 3], "enhancing": 3``). Every region becomes
one sigmoid output of the network. ``regions_class_order`` names the label id written for each region
when probabilities are turned back into a label map: starting from background 0, for each region in order
the voxels with probability above 0.5 get that id (later regions overwrite earlier ones).

Form::

    "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3},
    "regions_class_order": [1, 2, 3]

A label named ``ignore`` (partial annotation) keeps its meaning; it must not be part of any region.
"""

from __future__ import annotations

import re
from typing import Any

#: ``(label_ids, label_names, ignore_label, regions, regions_class_order)`` of :func:`parse_region_labels`.
RegionLabels = tuple[tuple[int, ...], tuple[str, ...], int | None, tuple[tuple[int, ...], ...], tuple[int, ...]]


def is_region_based(meta: dict[str, Any]) -> bool:
    """True when ``meta`` (a parsed dataset.json) declares region-based labels: a list-valued label or a
    ``regions_class_order`` entry."""
    labels = meta.get("labels")
    listed = isinstance(labels, dict) and any(isinstance(v, (list, tuple)) for v in labels.values())
    return listed or "regions_class_order" in meta


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def parse_region_labels(meta: dict[str, Any], problems: list[str]) -> RegionLabels:
    """Parse region-based ``labels`` + ``regions_class_order`` of a dataset.json.

    Args:
        meta: the parsed dataset.json (region-based, see :func:`is_region_based`).
        problems: every problem found is appended here (each names the dataset.json key).

    Returns:
        ``(label_ids, label_names, ignore_label, regions, regions_class_order)``: ``label_ids`` are the ids
        a label map may hold (background 0 and every id of any region, sorted; not the ignore label),
        ``label_names`` their names (the name of a single-id label, else ``label_<id>``), ``regions`` one
        tuple of sorted label ids per region in dataset.json order, ``regions_class_order`` the label id
        written for each region. All empty after a problem.
    """
    empty: RegionLabels = ((), (), None, (), ())
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        problems.append('\'labels\' is missing or empty; give e.g. {"background": 0, "whole": [1, 2], "core": 2}')
        return empty
    n_before = len(problems)
    background: str | None = None
    ignore_id: int | None = None
    names: list[str] = []
    regions: list[tuple[int, ...]] = []
    for name, value in labels.items():
        raw = list(value) if isinstance(value, (list, tuple)) else [value]
        ids = [_int(v) for v in raw]
        if not raw or any(i is None or i < 0 for i in ids):
            problems.append(
                f"'labels': region {name!r} maps to {value!r}; give a label id >= 0 or a non-empty "
                "list of them (region-based labels are name -> id(s))"
            )
            continue
        clean = tuple(sorted(set(int(i) for i in ids if i is not None)))
        if str(name).strip().lower() == "ignore":
            if len(clean) != 1 or isinstance(value, (list, tuple)):
                problems.append(f"'labels': 'ignore' maps to {value!r}; it must be a single label id")
            else:
                ignore_id = clean[0]
            continue
        if clean == (0,):
            background = str(name)
            continue
        if 0 in clean:
            problems.append(f"'labels': region {name!r} contains the background id 0 ({value!r})")
            continue
        names.append(str(name))
        regions.append(clean)
    if background is None:
        problems.append("'labels': no background label with id 0 is declared")
    if not regions and len(problems) == n_before:
        problems.append("'labels': no region besides the background is declared")
    if ignore_id is not None:
        if ignore_id == 0:
            problems.append("'labels': 'ignore' cannot be the background id 0")
        for name, reg in zip(names, regions):
            if ignore_id in reg:
                problems.append(
                    f"'labels': region {name!r} {list(reg)} contains the ignore label id {ignore_id}; "
                    "the ignore label marks unannotated voxels and cannot be part of a region"
                )
        top = max((i for reg in regions for i in reg), default=0)
        if ignore_id <= top and not any(ignore_id in reg for reg in regions):
            problems.append(
                f"'labels': ignore must be the highest label id; 'ignore' has id {ignore_id} but "
                f"id {top} is used by a region (give 'ignore' an id above every class, e.g. {top + 1})"
            )
    order_raw = meta.get("regions_class_order")
    if order_raw is None:
        listed = [n for n, v in labels.items() if isinstance(v, (list, tuple))]
        problems.append(
            f"'labels': region {listed[0]!r} is a list of label ids (region-based labels, regions may overlap) but "
            "'regions_class_order' is missing; give the label id written for each region, in "
            f'region order, e.g. "regions_class_order": {[max(r) for r in regions]}'
        )
        return empty
    order_ids = [_int(v) for v in order_raw] if isinstance(order_raw, (list, tuple)) else None
    if order_ids is None or any(v is None for v in order_ids):
        problems.append(f"'regions_class_order' must be a list of integer label ids, got {order_raw!r}")
        return empty
    order = [v for v in order_ids if v is not None]  # all of them (checked above)
    if len(problems) > n_before:
        return empty
    label_ids = tuple(sorted({0} | {i for reg in regions for i in reg}))
    if len(order) != len(regions):
        problems.append(
            f"'regions_class_order' has {len(order)} entries but 'labels' declares {len(regions)} "
            f"region(s) ({', '.join(names)}); give one label id per region, in region order"
        )
    bad = sorted({int(v) for v in order if v not in label_ids or v == 0})
    if bad:
        problems.append(
            f"'regions_class_order' holds id(s) {bad} that are not nonzero label ids of any region "
            f"(ids in regions: {list(label_ids[1:])})"
        )
    if len(problems) > n_before or background is None:  # no background: a problem was recorded above
        return empty
    single = {reg[0]: n for n, reg in zip(names, regions) if len(reg) == 1}
    label_names = tuple(background if i == 0 else single.get(i, f"label_{i}") for i in label_ids)
    return label_ids, label_names, ignore_id, tuple(regions), tuple(int(v) for v in order)


__all__ = ["RegionLabels", "is_region_based", "parse_region_labels"]
