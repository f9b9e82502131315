"""Cross-validation splits by case: ``WORK/splits.json``, written once and then respected.

The file is a list of folds, each ``{"train": [case ids], "val": [case ids]}``. It is created on the
first training run with a deterministic seeded shuffle (seed 12345) of the sorted case ids, so the
same cases always give the same folds. A user may edit it (e.g. to keep the scans of one patient in
one fold); medseg then uses the edited folds as they are, after checking them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.errors import ConfigError
from medseg.io.image import atomic_write_text
from medseg.io.workdir import WorkDir

logger = logging.getLogger(__name__)

NUM_FOLDS = 5
SPLIT_SEED = 12345


def make_splits(
    case_ids: Sequence[str], num_folds: int = NUM_FOLDS, seed: int = SPLIT_SEED
) -> list[dict[str, list[str]]]:
    """Deterministic ``num_folds``-fold split of ``case_ids``.

    Args:
        case_ids: the case identifiers (order does not matter; they are sorted first).
        num_folds: number of folds.
        seed: shuffle seed.

    Returns:
        ``num_folds`` dicts ``{"train": [...], "val": [...]}``; every case is in exactly one ``val``;
        fold sizes differ by at most one; ids sorted within each list.

    Raises:
        ConfigError: fewer cases than folds, or duplicate case ids.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        dups = sorted({c for c in ids if ids.count(c) > 1})
        raise ConfigError(f"duplicate case ids cannot be split into folds: {dups}")
    if len(ids) < num_folds:
        raise ConfigError(
            f"{len(ids)} case(s) cannot be split into {num_folds} cross-validation folds; add cases "
            f"(at least {num_folds}) or train on every case with `--fold all`"
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = []
    for k, val_idx in enumerate(np.array_split(order, num_folds)):
        val = sorted(ids[i] for i in val_idx)
        val_set = set(val)
        folds.append({"train": [c for c in ids if c not in val_set], "val": val})
        logger.debug("fold %d: %d train, %d val", k, len(ids) - len(val), len(val))
    return folds


def load_or_create_splits(
    work_dir: str | Path, case_ids: Sequence[str], num_folds: int = NUM_FOLDS, write: bool = True
) -> list[dict[str, list[str]]]:
    """Read ``WORK/splits.json``, or create it from ``case_ids`` when it does not exist.

    Args:
        work_dir: the work folder.
        case_ids: the preprocessed cases available for training.
        num_folds: folds of a newly created file.
        write: whether a newly created split may be written (False on non-zero DDP ranks).

    Returns:
        The folds.

    Raises:
        ConfigError: the file is malformed, names cases that are not preprocessed, or (when creating)
            there are fewer cases than folds.
    """
    path = WorkDir(work_dir).splits
    if path.is_file():
        return read_splits(path, case_ids)
    folds = make_splits(case_ids, num_folds)
    if write:
        atomic_write_text(path, json.dumps(folds, indent=1) + "\n")
        logger.info("wrote %s (%d folds of %d cases)", path, num_folds, len(case_ids))
    return folds


def read_splits(path: str | Path, case_ids: Sequence[str] | None = None) -> list[dict[str, list[str]]]:
    """Read and check a splits file.

    Raises:
        ConfigError: unreadable JSON, wrong structure, a case in both ``train`` and ``val`` of one fold,
            or (given ``case_ids``) unknown cases.
    """
    path = Path(path)
    try:
        folds = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the cross-validation splits ({exc}); fix or delete the file") from None
    if not isinstance(folds, list) or not folds:
        raise ConfigError(f'{path}: expected a non-empty list of folds {{"train": [...], "val": [...]}}')
    known = set(case_ids) if case_ids is not None else None
    problems: list[str] = []
    for k, fold in enumerate(folds):
        if (
            not isinstance(fold, dict)
            or not isinstance(fold.get("train"), list)
            or not isinstance(fold.get("val"), list)
        ):
            problems.append(f'fold {k}: expected {{"train": [...], "val": [...]}}')
            continue
        both = sorted(set(map(str, fold["train"])) & set(map(str, fold["val"])))
        if both:
            problems.append(f"fold {k}: case(s) in both train and val: {both[:5]}")
        if not fold["train"]:
            problems.append(f"fold {k}: empty training list")
        if known is not None:
            unknown = sorted({str(c) for c in fold["train"] + fold["val"]} - known)
            if unknown:
                problems.append(
                    f"fold {k}: case(s) not in the preprocessed data: {unknown[:5]}"
                    + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                )
    if problems:
        raise ConfigError(
            f"{path}: invalid splits:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nfix the file or delete it to have it recreated"
        )
    return [{"train": [str(c) for c in f["train"]], "val": [str(c) for c in f["val"]]} for f in folds]


def fold_cases(
    work_dir: str | Path, case_ids: Sequence[str], fold: int | str, write: bool = True
) -> tuple[list[str], list[str]]:
    """Training and held-out case ids of ``fold`` (``"all"``: every case trains, none is held out).

    Raises:
        ConfigError: the fold does not exist in the splits, or see :func:`load_or_create_splits`.
    """
    ids = sorted(case_ids)
    if not ids:
        raise ConfigError(f"{work_dir}: no preprocessed cases to train on; run `medseg plan` first")
    if fold == "all":
        return ids, []
    folds = load_or_create_splits(work_dir, ids, write=write)
    if not isinstance(fold, int) or not 0 <= fold < len(folds):
        raise ConfigError(
            f"fold {fold!r} does not exist: {WorkDir(work_dir).splits} has folds 0-{len(folds) - 1}; "
            "use one of them or --fold all"
        )
    return list(folds[fold]["train"]), list(folds[fold]["val"])
