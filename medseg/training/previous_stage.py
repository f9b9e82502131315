"""A cascade's training-time previous stage: the low-resolution folds' cross-validated predictions, cached.

**Training** (as nnU-Net): each case's previous-stage segmentation is the cross-validated prediction of the
``3d_lowres`` fold that held it out (``runs/3d_lowres/<arch>/fold_<k>/validation/<case>.nii.gz``: original
label ids, original geometry). :func:`prepare_previous_stage` maps it onto the case's preprocessed grid
(:func:`medseg.preprocessing.previous_stage.to_preprocessed_grid`) and stores it atomically in
``WORK/preprocessed/<configuration>_from_<previous stage>/<case>.npz`` (``seg`` class indices ``(z, y, x)``,
:meth:`medseg.io.workdir.WorkDir.previous_stage`) with ``<case>.json`` (the source file, its size and
modification time) written last; a retrained fold's newer predictions are converted again. It refuses
(:class:`~medseg.errors.ConfigError`) while any fold's predictions are missing, naming the folds and the
commands that train them. In training the previous-stage channels are also degraded at random
(:func:`medseg.training.augmentation.perturb_previous_stage`), so the cascade learns to correct them.

The array operations (one-hot channels, the grid mapping) are :mod:`medseg.preprocessing.previous_stage`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.errors import ConfigError, MedsegError
from medseg.io.image import atomic_write_bytes, atomic_write_text, read_image
from medseg.io.workdir import WorkDir
from medseg.planning.plan import Plan
from medseg.planning.stage import Stage
from medseg.preprocessing import CaseProperties, labels_to_classes, load_case, load_case_properties
from medseg.preprocessing.previous_stage import append_previous_stage, to_preprocessed_grid
from medseg.preprocessing.storage import npz_bytes
from medseg.training.splits import load_or_create_splits

logger = logging.getLogger(__name__)

_SEGMENTATION = ".nii.gz"


def previous_stage_folder(work_dir: str | Path, plan: Plan, configuration: str) -> Path:
    """``WORK/preprocessed/<configuration>_from_<previous stage>`` (:meth:`WorkDir.previous_stage`).

    Raises:
        MedsegError: ``configuration`` is not a cascade.
    """
    return WorkDir(work_dir).previous_stage(configuration, _previous_stage(plan, configuration))


def _previous_stage(plan: Plan, configuration: str) -> str:
    prev = plan.configuration(configuration).previous_stage
    if prev is None:
        raise MedsegError(f"configuration {configuration!r} is not a cascade (it has no previous_stage)")
    return prev


def _source_stamp(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"source": str(path), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _fold_of_cases(work_dir: Path, case_ids: Sequence[str]) -> dict[str, int]:
    """Case -> the fold of ``splits.json`` holding it out (the splits a first run would write, when none)."""
    try:
        folds = load_or_create_splits(work_dir, sorted(case_ids), write=False)
    except ConfigError:
        return {}
    return {c: k for k, fold in enumerate(folds) for c in fold["val"]}


def _missing_message(
    work_dir: Path, configuration: str, prev: str, arch: str, missing: list[str], fold_of: dict[str, int]
) -> str:
    wd = WorkDir(work_dir)
    by_fold: dict[int | None, list[str]] = {}
    for c in missing:
        by_fold.setdefault(fold_of.get(c), []).append(c)
    lines = [
        f"{configuration}/{arch} trains on the cross-validated {prev} predictions of its cases, but "
        f"{len(missing)} case(s) have none yet:"
    ]
    for fold in sorted(by_fold, key=lambda f: -1 if f is None else f):
        cases = by_fold[fold]
        shown = ", ".join(cases[:5]) + (f" and {len(cases) - 5} more" if len(cases) > 5 else "")
        if fold is None:
            why = (
                f"held out by no fold of {wd.splits}"
                if wd.splits.is_file()
                else "no cross-validation folds (fewer cases than folds): a cascade cannot be trained"
            )
            lines.append(f"  - {shown}: {why}")
            continue
        run = wd.run(prev, arch, fold)
        done = run.checkpoint("final").is_file()
        how = f"its final validation did not write them: delete {run.path} and train it again" if done else "train it"
        lines.append(
            f"  - {prev} fold {fold} ({shown}); {how}: "
            f"`medseg train {work_dir} --config {prev} --arch {arch} --fold {fold}`"
        )
    return "\n".join(lines)


def _lowres_predictions(wd: WorkDir, prev: str, arch: str) -> dict[str, Path]:
    """Case -> the cross-validated segmentation of the previous stage's numbered folds (the lower fold first)."""
    sources: dict[str, Path] = {}
    for run in wd.fold_runs(prev, arch).values():
        if run.fold == "all":
            continue
        for case_id, pred in run.validation_files(_SEGMENTATION).items():
            sources.setdefault(case_id, pred)
    return sources


def prepare_previous_stage(work_dir: str | Path, stage: Stage, case_ids: Sequence[str]) -> Path:
    """Store the previous stage's cross-validated segmentation of ``case_ids`` on the cascade's grid.

    Cases already stored from the same (unchanged) prediction file are skipped.

    Args:
        work_dir: the work folder.
        stage: the cascade configuration and the architecture whose previous-stage runs
            (``runs/<previous stage>/<arch>/fold_<k>``) are used.
        case_ids: the cases to train and validate on.

    Returns:
        The folder holding them (:func:`previous_stage_folder`).

    Raises:
        ConfigError: some cases have no prediction (the message names the folds to train and the commands).
        MedsegError: a prediction is unreadable or does not fit its case.
    """
    work_dir = Path(work_dir)
    plan, configuration, arch = stage.plan, stage.config_name, stage.arch
    prev = _previous_stage(plan, configuration)
    sources = _lowres_predictions(WorkDir(work_dir), prev, arch)
    missing = [c for c in case_ids if c not in sources]
    if missing:
        raise ConfigError(
            _missing_message(work_dir, configuration, prev, arch, sorted(missing), _fold_of_cases(work_dir, case_ids))
        )
    folder = previous_stage_folder(work_dir, plan, configuration)
    folder.mkdir(parents=True, exist_ok=True)
    converted = 0
    for cid in case_ids:
        stamp = _source_stamp(sources[cid])
        js, npz = folder / f"{cid}.json", folder / f"{cid}.npz"
        if js.is_file() and npz.is_file():
            try:
                if json.loads(js.read_text()) == stamp:
                    continue
            except (OSError, ValueError):
                pass
        js.unlink(missing_ok=True)  # invalidate before the array changes
        labels, _ = read_image(sources[cid])
        classes = labels_to_classes(labels, plan.label_ids, source=str(sources[cid]))
        props = load_case_properties(work_dir, plan, configuration, cid)
        atomic_write_bytes(npz, npz_bytes({"seg": to_preprocessed_grid(classes, props)}))
        atomic_write_text(js, json.dumps(stamp))
        converted += 1
    if converted:
        logger.info("%s: %d %s segmentation(s) mapped onto the %s grid", folder, converted, prev, configuration)
    return folder


def load_previous_stage(work_dir: str | Path, plan: Plan, configuration: str, case_id: str) -> np.ndarray:
    """The stored previous-stage class indices ``(z, y, x)`` of one case (see :func:`prepare_previous_stage`).

    Raises:
        MedsegError: not prepared, or unreadable.
    """
    folder = previous_stage_folder(work_dir, plan, configuration)
    npz = folder / f"{case_id}.npz"
    if not (folder / f"{case_id}.json").is_file() or not npz.is_file():
        raise MedsegError(
            f"{npz}: no previous-stage segmentation of case {case_id!r}; `medseg train --config "
            f"{configuration}` prepares it from the {_previous_stage(plan, configuration)} folds"
        )
    try:
        with np.load(npz) as f:
            return f["seg"]
    except Exception as exc:
        raise MedsegError(f"{npz}: unreadable previous-stage segmentation ({exc}); delete it and train again") from None


def load_network_input(
    work_dir: str | Path, plan: Plan, configuration: str, case_id: str
) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """:func:`~medseg.preprocessing.load_case`, with a cascade's previous-stage channels appended to ``data``.

    Returns:
        ``(data float32 (plan.network_in_channels(configuration), z, y, x), seg, props)``.
    """
    data, seg, props = load_case(work_dir, plan, configuration, case_id)
    if plan.configuration(configuration).previous_stage is not None:
        data = append_previous_stage(data, load_previous_stage(work_dir, plan, configuration, case_id), plan)
    return data, seg, props
