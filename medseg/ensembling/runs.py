"""Discover trained runs and their cross-validation predictions in a work folder.

Layout (:mod:`medseg.io.workdir`): ``WORK/runs/<configuration>/<arch>/fold_<k>/`` (``fold_all`` for a run on every
case) with ``checkpoint_{final,best,latest}.pt`` and ``validation/<case_id>.npz`` (``probabilities``
float16 ``(K, Z, Y, X)`` on the original grid).
"""

from __future__ import annotations

import logging
from pathlib import Path

from medseg.io.workdir import ALL, WorkDir, parse_fold

logger = logging.getLogger(__name__)

_PROBABILITIES = ".npz"


def find_trained_runs(
    work_dir: str | Path, configuration: str, arch: str, checkpoint: str = "final"
) -> dict[str, Path]:
    """Run folders of ``configuration``/``arch`` that hold the checkpoint ``checkpoint`` (``final``, ...).

    Returns:
        ``{"fold_0": path, ..., "fold_all": path}`` (only those present), sorted by fold.
    """
    return {
        name: run.path
        for name, run in WorkDir(work_dir).fold_runs(configuration, arch).items()
        if run.checkpoint(checkpoint).is_file()
    }


def find_validation_predictions(work_dir: str | Path) -> dict[tuple[str, str], dict[str, Path]]:
    """Cross-validation probabilities of every (configuration, architecture) in ``WORK/runs``.

    Only numbered folds count (``fold_all`` has no held-out cases). A case predicted by two folds (an
    edited ``splits.json``) keeps the lower fold's prediction.

    Returns:
        ``{(configuration, arch): {case_id: npz path}}``; pairs without any predictions are left out.
    """
    wd = WorkDir(work_dir)
    out: dict[tuple[str, str], dict[str, Path]] = {}
    for configuration, arch in wd.run_pairs():
        cases: dict[str, Path] = {}
        for run in wd.fold_runs(configuration, arch).values():
            if run.fold == ALL:
                continue
            for case_id, npz in run.validation_files(_PROBABILITIES).items():
                if case_id in cases:
                    logger.warning(
                        "%s: case %s is also predicted by %s; keeping that one", npz, case_id, cases[case_id]
                    )
                    continue
                cases[case_id] = npz
        if cases:
            out[(configuration, arch)] = cases
    return out


def folds_of(predictions: dict[str, Path]) -> list[int]:
    """Fold numbers that produced a set of validation predictions (sorted)."""
    folds = {parse_fold(p.parent.parent.name) for p in predictions.values()}
    return sorted(f for f in folds if isinstance(f, int))
