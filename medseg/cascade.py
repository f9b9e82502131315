"""The cascade's previous stage: where its segmentation comes from and how it enters the network.

A cascade configuration (``3d_cascade_fullres``, ``ConfigurationPlan.previous_stage = "3d_lowres"``) trains
and predicts on the ``3d_fullres`` grid; its networks take, after the image channels, the previous stage's
segmentation as one one-hot channel per foreground label (channel ``C + k - 1`` is 1 where the previous
stage predicted class ``k``; :meth:`~medseg.planning.plan.Plan.network_in_channels`). Spatial augmentation
moves these channels with the image (linear interpolation of the one-hot maps); intensity augmentation
leaves them alone.

**Training** (as nnU-Net): each case's previous-stage segmentation is the cross-validated prediction of the
``3d_lowres`` fold that held it out (``runs/3d_lowres/<arch>/fold_<k>/validation/<case>.nii.gz``: original
label ids, original geometry). :func:`prepare_previous_stage` maps it onto the case's preprocessed grid
(the crop and resampling of the case's ``CaseProperties``, nearest-like one-hot resampling of
:func:`~medseg.preprocessing.resampling.resample_segmentation`) and stores it atomically in
``WORK/preprocessed/<configuration>_from_<previous stage>/<case>.npz`` (``seg`` class indices ``(z, y, x)``)
with ``<case>.json`` (the source file, its size and modification time) written last; a retrained fold's
newer predictions are converted again. It refuses (:class:`~medseg.errors.ConfigError`) while any fold's
predictions are missing, naming the folds and the commands that train them.

**Prediction**: the previous stage's ensemble (every trained fold) segments the raw image first; that
segmentation, on the original grid, goes through the same mapping (:func:`to_preprocessed_grid`).
In training the previous-stage channels are also degraded at random (morphology, removal of a component:
:func:`medseg.training.augmentation.perturb_previous_stage`), so the cascade learns to correct them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import ConfigError, MedsegError
from medseg.io.image import atomic_write_bytes, atomic_write_text
from medseg.planning.plan import Plan

if TYPE_CHECKING:
    from medseg.preprocessing.case import CaseProperties

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- arrays
def onehot_previous_stage(classes: np.ndarray, num_foreground: int) -> np.ndarray:
    """One-hot foreground channels of a class-index map.

    Args:
        classes: ``(Z, Y, X)`` class indices ``0..num_foreground`` (0 = background; larger values, e.g. an
            ignore class, give no channel).
        num_foreground: foreground classes ``L`` (:attr:`Plan.previous_stage_channels`).

    Returns:
        float32 ``(L, Z, Y, X)``; channel ``k - 1`` is 1 where ``classes == k``.
    """
    out = np.zeros((num_foreground, *classes.shape), dtype=np.float32)
    for k in range(1, num_foreground + 1):
        out[k - 1][classes == k] = 1.0
    return out


def append_previous_stage(data: np.ndarray, classes: np.ndarray, plan: Plan) -> np.ndarray:
    """The network input of a cascade: image ``(C, Z, Y, X)`` + one-hot previous stage ``(L, Z, Y, X)``.

    Raises:
        MedsegError: the segmentation's grid differs from the image's.
    """
    if tuple(classes.shape) != tuple(data.shape[1:]):
        raise MedsegError(f"the previous stage's segmentation has shape {list(classes.shape)}, the image "
                          f"{list(data.shape[1:])}; they must lie on the same grid")
    onehot = onehot_previous_stage(classes, plan.previous_stage_channels)
    return np.concatenate([np.asarray(data, dtype=np.float32), onehot], axis=0)


def to_preprocessed_grid(classes: np.ndarray, props: CaseProperties) -> np.ndarray:
    """Map a class-index map of the original image grid onto the case's preprocessed grid.

    The inverse of :func:`~medseg.preprocessing.revert_to_original` for segmentations: crop to
    ``props.bbox``, resample from ``props.shape_after_crop`` to ``props.shape_after_resample`` (one-hot linear;
    nearest along the coarse axis of anisotropic data), as preprocessing does with a label.

    Args:
        classes: ``props.geometry.shape`` class indices (``(Z, Y, X)``, or ``(Y, X)`` for a 2D image).
        props: the case's properties in the target configuration.

    Returns:
        ``props.shape_after_resample`` class indices ``(z, y, x)``, dtype of ``classes``.

    Raises:
        MedsegError: ``classes`` does not have the original image's shape.
    """
    from medseg.preprocessing.case import spacing_3d
    from medseg.preprocessing.resampling import resample_segmentation

    if tuple(classes.shape) != tuple(props.geometry.shape):
        raise MedsegError(f"{props.case_id}: previous-stage segmentation of shape {list(classes.shape)}, but the "
                          f"image has shape {list(props.geometry.shape)}")
    arr = classes[None] if props.geometry.ndim == 2 else classes
    cropped = np.ascontiguousarray(arr[tuple(slice(a, b) for a, b in props.bbox)])
    spacing = spacing_3d(props.geometry, props.spacing_after_resample)
    return resample_segmentation(cropped, props.shape_after_resample, spacing, props.spacing_after_resample)


# ---------------------------------------------------------------------- training-time previous stage
def previous_stage_folder(work_dir: str | Path, plan: Plan, configuration: str) -> Path:
    """``WORK/preprocessed/<configuration>_from_<previous stage>``."""
    prev = _previous_stage(plan, configuration)
    return Path(work_dir) / "preprocessed" / f"{configuration}_from_{prev}"


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
    from medseg.training.splits import load_or_create_splits

    try:
        folds = load_or_create_splits(work_dir, sorted(case_ids), write=False)
    except ConfigError:
        return {}
    return {c: k for k, fold in enumerate(folds) for c in fold["val"]}


def _missing_message(work_dir: Path, configuration: str, prev: str, arch: str, missing: list[str],
                     fold_of: dict[str, int]) -> str:
    by_fold: dict[int | None, list[str]] = {}
    for c in missing:
        by_fold.setdefault(fold_of.get(c), []).append(c)
    lines = [f"{configuration}/{arch} trains on the cross-validated {prev} predictions of its cases, but "
             f"{len(missing)} case(s) have none yet:"]
    for fold in sorted(by_fold, key=lambda f: -1 if f is None else f):
        cases = by_fold[fold]
        shown = ", ".join(cases[:5]) + (f" and {len(cases) - 5} more" if len(cases) > 5 else "")
        if fold is None:
            why = (f"held out by no fold of {work_dir / 'splits.json'}" if (work_dir / "splits.json").is_file()
                   else "no cross-validation folds (fewer cases than folds): a cascade cannot be trained")
            lines.append(f"  - {shown}: {why}")
            continue
        run = work_dir / "runs" / prev / arch / f"fold_{fold}"
        done = (run / "checkpoint_final.pt").is_file()
        how = (f"its final validation did not write them: delete {run} and train it again"
               if done else "train it")
        lines.append(f"  - {prev} fold {fold} ({shown}); {how}: "
                     f"`medseg train {work_dir} --config {prev} --arch {arch} --fold {fold}`")
    return "\n".join(lines)


def prepare_previous_stage(work_dir: str | Path, plan: Plan, configuration: str, arch: str,
                           case_ids: Sequence[str]) -> Path:
    """Store the previous stage's cross-validated segmentation of ``case_ids`` on the cascade's grid.

    Cases already stored from the same (unchanged) prediction file are skipped.

    Args:
        work_dir: the work folder.
        plan: the plan; ``configuration`` must be a cascade.
        configuration: the cascade configuration.
        arch: architecture whose previous-stage runs (``runs/<previous stage>/<arch>/fold_<k>``) are used.
        case_ids: the cases to train and validate on.

    Returns:
        The folder holding them (:func:`previous_stage_folder`).

    Raises:
        ConfigError: some cases have no prediction (the message names the folds to train and the commands).
        MedsegError: a prediction is unreadable or does not fit its case.
    """
    from medseg.io.image import read_image
    from medseg.preprocessing import labels_to_classes, load_case_properties
    from medseg.preprocessing.storage import npz_bytes

    work_dir = Path(work_dir)
    prev = _previous_stage(plan, configuration)
    base = work_dir / "runs" / prev / arch
    sources: dict[str, Path] = {}
    for fold_dir in sorted(base.glob("fold_*")) if base.is_dir() else []:
        if fold_dir.name == "fold_all":
            continue
        for pred in sorted((fold_dir / "validation").glob("*.nii.gz")):
            sources.setdefault(pred.name[: -len(".nii.gz")], pred)
    missing = [c for c in case_ids if c not in sources]
    if missing:
        raise ConfigError(_missing_message(work_dir, configuration, prev, arch, sorted(missing),
                                           _fold_of_cases(work_dir, case_ids)))
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
        raise MedsegError(f"{npz}: no previous-stage segmentation of case {case_id!r}; `medseg train --config "
                          f"{configuration}` prepares it from the {_previous_stage(plan, configuration)} folds")
    try:
        with np.load(npz) as f:
            return f["seg"]
    except Exception as exc:
        raise MedsegError(f"{npz}: unreadable previous-stage segmentation ({exc}); delete it and train again") from None


def load_network_input(work_dir: str | Path, plan: Plan, configuration: str,
                       case_id: str) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """:func:`~medseg.preprocessing.load_case`, with a cascade's previous-stage channels appended to ``data``.

    Returns:
        ``(data float32 (plan.network_in_channels(configuration), z, y, x), seg, props)``.
    """
    from medseg.preprocessing import load_case

    data, seg, props = load_case(work_dir, plan, configuration, case_id)
    if plan.configuration(configuration).previous_stage is not None:
        data = append_previous_stage(data, load_previous_stage(work_dir, plan, configuration, case_id), plan)
    return data, seg, props
