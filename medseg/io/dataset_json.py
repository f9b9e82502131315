"""dataset.json's declarations of channels and labels (ordinary, not region-based, labels).

The parsers collect every problem they find in a list instead of raising, so that
:func:`medseg.io.dataset.load_dataset` reports all of a dataset.json's problems at once.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any


def _as_int(value: Any) -> int | None:
    """``value`` as an int when it is an integer (int, integral float, or integer string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def parse_channels(meta: dict[str, Any], problems: list[str]) -> tuple[str, ...]:
    """The channel names of ``meta["channel_names"]`` (nnU-Net v2) or ``meta["modality"]`` (MSD).

    Args:
        meta: the parsed dataset.json.
        problems: list the problems found are appended to (each a sentence without the file name).

    Returns:
        One name per channel in channel order, e.g. ``("T1", "FLAIR")``; ``()`` when there is a problem.
    """
    key = "channel_names" if "channel_names" in meta else "modality" if "modality" in meta else None
    if key is None:
        problems.append('neither \'channel_names\' nor \'modality\' is given (e.g. "channel_names": {"0": "CT"})')
        return ()
    src = meta[key]
    if not isinstance(src, dict) or not src:
        problems.append(f'\'{key}\' must be a non-empty mapping of channel index to name, e.g. {{"0": "MRI"}}')
        return ()
    indexed: dict[int, str] = {}
    for k, v in src.items():
        idx = _as_int(k)
        if idx is None or idx < 0:
            problems.append(f"'{key}' has key {k!r}; keys must be channel indices 0, 1, ...")
            return ()
        indexed[idx] = str(v)
    if sorted(indexed) != list(range(len(indexed))):
        problems.append(f"'{key}' channel indices {sorted(indexed)} must be 0..{len(indexed) - 1} without gaps")
        return ()
    return tuple(indexed[i] for i in range(len(indexed)))


def parse_labels(meta: dict[str, Any], problems: list[str]) -> tuple[tuple[int, ...], tuple[str, ...], int | None]:
    """``(label_ids, label_names, ignore_label)`` of ``meta["labels"]``; ids and names without the ignore label.

    Both forms are read: id -> name (``{"0": "background"}``) and name -> id (``{"background": 0}``).

    Args:
        meta: the parsed dataset.json (ordinary labels; region-based ones go through
            :func:`medseg.io.regions.parse_region_labels`).
        problems: list the problems found are appended to (each a sentence without the file name).

    Returns:
        Sorted label ids (background 0 first), their names, and the id of the label named ``ignore`` (or
        None); ``((), (), None)`` when there is a problem.
    """
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        problems.append('\'labels\' is missing or empty; give e.g. {"0": "background", "1": "tumour"}')
        return (), (), None
    form_hint = '\'labels\' must map ids to names ({"0": "background", ...}) or names to ids ({"background": 0, ...})'
    region = [k for k, v in labels.items() if isinstance(v, (list, tuple, dict))]
    if region:
        problems.append(
            f"label {region[0]!r} maps to {labels[region[0]]!r}: give one integer id per class, or a "
            "list of ids per region with 'regions_class_order' (region-based labels)"
        )
        return (), (), None
    pairs: list[tuple[int, str]] = []
    if all(isinstance(v, str) for v in labels.values()) and not all(_as_int(v) is not None for v in labels.values()):
        # id -> name
        for k, v in labels.items():
            idx = _as_int(k)
            if idx is None:
                problems.append(f"label id {k!r} (named {v!r}) is not an integer; {form_hint}")
                continue
            pairs.append((idx, v))
    else:
        # name -> id
        for k, v in labels.items():
            idx = _as_int(v)
            if idx is None:
                problems.append(f"label {k!r} has id {v!r}, which is not an integer; {form_hint}")
                continue
            pairs.append((idx, str(k)))
    if problems:
        return (), (), None
    ids = [i for i, _ in pairs]
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        problems.append(f"label id(s) {dup} declared more than once")
    neg = sorted(i for i in ids if i < 0)
    if neg:
        problems.append(f"negative label id(s) {neg}; ids must be >= 0")
    if 0 not in ids:
        problems.append("no background label with id 0 is declared")
    ignore = [i for i, n in pairs if n.strip().lower() == "ignore"]
    if len(ignore) > 1:
        problems.append(
            f"'labels' declares {len(ignore)} labels named 'ignore' (ids {sorted(ignore)}); at most one is allowed"
        )
    elif ignore and ignore[0] != max(ids):
        problems.append(
            f"'labels': ignore must be the highest label id; 'ignore' has id {ignore[0]} but "
            f"id {max(ids)} is declared too (give 'ignore' an id above every class, e.g. {max(ids) + 1})"
        )
    elif ignore and ignore[0] == 0:
        problems.append("'labels': 'ignore' cannot be the background id 0")
    if problems:
        return (), (), None
    pairs.sort()
    ignore_id = ignore[0] if ignore else None
    kept = [(i, n) for i, n in pairs if i != ignore_id]
    return tuple(i for i, _ in kept), tuple(n for _, n in kept), ignore_id


__all__ = ["parse_channels", "parse_labels"]
