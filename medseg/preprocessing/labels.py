"""Label ids <-> contiguous class indices, and foreground voxel sampling for oversampling.

Datasets may use gapped label ids (``0, 1, 2, 5, 117``). Internally class ``k`` is ``label_ids[k]``; the
original ids come back only on export.

An ignore label (nnU-Net v2 partial annotation, ``Plan.ignore_label``) becomes class index ``K =
len(label_ids)``, one past the last class: it survives one-hot resampling, cropping, nearest-neighbour
augmentation and deep-supervision downsampling unchanged, while padding fills with background 0. Losses
and metrics skip index ``K``; no network has an output for it, so no prediction holds it.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from medseg.errors import MedsegError

#: Maximum number of voxel coordinates stored per foreground class.
MAX_LOCATIONS_PER_CLASS = 10000


def seg_dtype(num_classes: int) -> np.dtype:
    """Storage dtype of class-index maps: int8 when ``num_classes <= 127``, else int16."""
    return np.dtype(np.int8) if num_classes <= 127 else np.dtype(np.int16)


def label_dtype(label_ids: Sequence[int]) -> np.dtype:
    """Dtype of exported label maps: uint8 when every id < 256, else uint16 (int32 beyond 65535)."""
    top = max(label_ids) if len(label_ids) else 0
    if top < 256:
        return np.dtype(np.uint8)
    if top < 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def labels_to_classes(
    label: np.ndarray, label_ids: Sequence[int], source: str = "label", ignore_label: int | None = None
) -> np.ndarray:
    """Map original label ids to class indices ``0..K-1`` (and the ignore label to ``K``).

    Args:
        label: ``(Z, Y, X)`` label ids (any integer dtype, or floats holding exact integers).
        label_ids: sorted original ids, background 0 first.
        source: name of the file or case, used in error messages.
        ignore_label: original id of the ignore label (not in ``label_ids``), or None.

    Returns:
        ``(Z, Y, X)`` class indices, int8 (``K <= 127``) or int16; ignored voxels hold ``K = len(label_ids)``.

    Raises:
        MedsegError: non-integer values, or ids not in ``label_ids`` (nor the ignore label).
    """
    if ignore_label is not None:
        if int(ignore_label) in set(int(i) for i in label_ids):
            raise ValueError(f"ignore label {ignore_label} is also a class id {list(label_ids)}")
        label_ids = [*label_ids, int(ignore_label)]  # index K, one past the classes
    ids = np.asarray(label_ids, dtype=np.int64)
    if label.dtype.kind == "f":
        if not np.isfinite(label).all() or not np.array_equal(label, np.round(label)):
            raise MedsegError(f"{source}: label map holds non-integer values")
    lab = label.astype(np.int64, copy=False)
    out_dtype = seg_dtype(len(ids) - (ignore_label is not None))
    lo, hi = (int(lab.min()), int(lab.max())) if lab.size else (0, 0)
    if lo >= 0 and hi < 1 << 20:
        lut = np.full(max(hi, int(ids.max())) + 1, -1, dtype=np.int64)
        lut[ids] = np.arange(len(ids))
        classes = lut[lab]
        unknown_mask = classes < 0
    else:
        pos = np.clip(np.searchsorted(ids, lab), 0, len(ids) - 1)
        unknown_mask = ids[pos] != lab
        classes = pos
    if unknown_mask.any():
        unknown = sorted(int(v) for v in np.unique(lab[unknown_mask]))
        raise MedsegError(
            f"{source}: label values {unknown[:20]} are not declared in dataset.json (declared: {list(map(int, ids))})"
        )
    return classes.astype(out_dtype)


def classes_to_labels(seg: np.ndarray, label_ids: Sequence[int], ignore_label: int | None = None) -> np.ndarray:
    """Map class indices ``0..K-1`` back to original label ids (uint8/uint16 per :func:`label_dtype`).

    With ``ignore_label`` the ignore class ``K`` maps back to it (references rebuilt from preprocessed
    labels); predictions never hold ``K``.

    Raises:
        ValueError: a class index outside ``0..K-1`` (``0..K`` with ``ignore_label``).
    """
    if ignore_label is not None:
        label_ids = [*label_ids, int(ignore_label)]
    ids = np.asarray(label_ids, dtype=np.int64)
    if seg.size and (int(seg.min()) < 0 or int(seg.max()) >= len(ids)):
        raise ValueError(f"class indices must lie in 0..{len(ids) - 1}, got {int(seg.min())}..{int(seg.max())}")
    return ids.astype(label_dtype(label_ids))[seg]


def case_seed(case_id: str) -> int:
    """Deterministic seed for per-case random choices (stable across processes and runs)."""
    return zlib.crc32(case_id.encode("utf-8"))


def sample_class_locations_array(
    seg: np.ndarray, num_classes: int, seed: int, max_per_class: int = MAX_LOCATIONS_PER_CLASS
) -> np.ndarray:
    """Randomly sample voxel coordinates of every foreground class, as one compact array.

    Only classes ``1..K-1`` are sampled: background and ignored voxels (index ``K``) are never a
    foreground-oversampling centre.

    Args:
        seg: ``(Z, Y, X)`` class indices (``K`` = ignored).
        num_classes: K including background (the ignore label excluded).
        seed: RNG seed (see :func:`case_seed`).
        max_per_class: at most this many coordinates per class (all voxels when fewer).

    Returns:
        int32 ``(N, 1 + seg.ndim)`` rows ``[class, z, y, x]``, sorted by class then C order.
    """
    rng = np.random.default_rng(seed)
    flat = seg.ravel()
    fg = np.flatnonzero(flat > 0)
    values = flat[fg]
    order = np.argsort(values, kind="stable")
    fg, values = fg[order], values[order]
    bounds = np.searchsorted(values, np.arange(1, num_classes + 1))
    chunks = []
    for k in range(1, num_classes):
        idx = fg[bounds[k - 1] : bounds[k]]
        if idx.size > max_per_class:
            idx = np.sort(rng.choice(idx, size=max_per_class, replace=False))
        if idx.size:
            chunks.append(np.column_stack([np.full(idx.size, k), *np.unravel_index(idx, seg.shape)]))
    if not chunks:
        return np.zeros((0, 1 + seg.ndim), dtype=np.int32)
    return np.concatenate(chunks).astype(np.int32)


def locations_to_dict(locations: np.ndarray, num_classes: int) -> dict[int, list[list[int]]]:
    """``[class, z, y, x]`` rows -> ``{k: [[z, y, x], ...]}`` for every ``k`` in ``1..K-1`` (empty lists for absent classes)."""
    out: dict[int, list[list[int]]] = {k: [] for k in range(1, num_classes)}
    if locations.size:
        classes = locations[:, 0]
        starts = np.searchsorted(classes, np.arange(1, num_classes + 1))
        for k in range(1, num_classes):
            if starts[k] > starts[k - 1]:
                out[k] = locations[starts[k - 1] : starts[k], 1:].tolist()
    return out


def locations_to_array(locations: dict[int, list[list[int]]], ndim: int = 3) -> np.ndarray:
    """Inverse of :func:`locations_to_dict`."""
    rows = [
        np.column_stack([np.full(len(v), k), np.asarray(v, dtype=np.int64).reshape(-1, ndim)])
        for k, v in sorted(locations.items())
        if len(v)
    ]
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 1 + ndim), dtype=np.int32)


def sample_class_locations(
    seg: np.ndarray, num_classes: int, seed: int, max_per_class: int = MAX_LOCATIONS_PER_CLASS
) -> dict[int, list[list[int]]]:
    """Randomly sample voxel coordinates of every foreground class (for foreground oversampling).

    Arguments and sampling as :func:`sample_class_locations_array` (the same seed picks the same voxels).

    Returns:
        ``{k: [[z, y, x], ...]}`` for every ``k`` in ``1..K-1`` (empty list when the class is absent),
        coordinates sorted in C order.
    """
    return locations_to_dict(sample_class_locations_array(seg, num_classes, seed, max_per_class), num_classes)
