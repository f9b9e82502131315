"""Discover trained runs and their cross-validation predictions in a work folder.

Layout (see CONTRACTS): ``WORK/runs/<configuration>/<arch>/fold_<k>/`` (``fold_all`` for a run on every
case) with ``checkpoint_{final,best,latest}.pt`` and ``validation/<case_id>.npz`` (``probabilities``
float16 ``(K, Z, Y, X)`` on the original grid).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

_FOLD = re.compile(r"^fold_(\d+|all)$")


def find_trained_runs(work_dir: str | Path, configuration: str, arch: str,
                      checkpoint: str = "final") -> dict[str, Path]:
    """Run folders of ``configuration``/``arch`` that hold ``checkpoint_<checkpoint>.pt``.

    Returns:
        ``{"fold_0": path, ..., "fold_all": path}`` (only those present), sorted by fold.
    """
    base = Path(work_dir) / "runs" / configuration / arch
    if not base.is_dir():
        return {}
    found = {d.name: d for d in base.iterdir()
             if d.is_dir() and _FOLD.match(d.name) and (d / f"checkpoint_{checkpoint}.pt").is_file()}
    return dict(sorted(found.items(), key=lambda kv: _fold_key(kv[0])))


def _fold_key(name: str) -> tuple[bool, int]:
    return (name == "fold_all", 0 if name == "fold_all" else int(name[5:]))


def find_validation_predictions(work_dir: str | Path) -> dict[tuple[str, str], dict[str, Path]]:
    """Cross-validation probabilities of every (configuration, architecture) in ``WORK/runs``.

    Only numbered folds count (``fold_all`` has no held-out cases). A case predicted by two folds (an
    edited ``splits.json``) keeps the lower fold's prediction.

    Returns:
        ``{(configuration, arch): {case_id: npz path}}``; pairs without any predictions are left out.
    """
    runs = Path(work_dir) / "runs"
    out: dict[tuple[str, str], dict[str, Path]] = {}
    if not runs.is_dir():
        return out
    for cfg_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        for arch_dir in sorted(p for p in cfg_dir.iterdir() if p.is_dir()):
            cases: dict[str, Path] = {}
            folds = sorted((d for d in arch_dir.iterdir()
                            if d.is_dir() and _FOLD.match(d.name) and d.name != "fold_all"),
                           key=lambda d: _fold_key(d.name))
            for fold_dir in folds:
                for npz in sorted((fold_dir / "validation").glob("*.npz")):
                    case_id = npz.name[: -len(".npz")]
                    if case_id in cases:
                        logger.warning("%s: case %s is also predicted by %s; keeping that one", npz, case_id,
                                       cases[case_id])
                        continue
                    cases[case_id] = npz
            if cases:
                out[(cfg_dir.name, arch_dir.name)] = cases
    return out


def folds_of(predictions: dict[str, Path]) -> list[int]:
    """Fold numbers that produced a set of validation predictions (sorted)."""
    return sorted({int(p.parent.parent.name[5:]) for p in predictions.values()})
