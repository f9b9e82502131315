"""Where find-best finds the training dataset's files: its folder, and the reference label of a case."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.io.image import IMAGE_SUFFIXES, ImageGeometry, read_image
from medseg.io.workdir import WorkDir
from medseg.planning.plan import Plan
from medseg.preprocessing import classes_to_labels, load_case, revert_to_original

__all__ = ["ReferenceLoader", "dataset_root", "reference_loader"]

logger = logging.getLogger(__name__)


def dataset_root(work_dir: Path, data_dir: str | Path | None = None) -> Path | None:
    """``data_dir``, else the dataset folder ``medseg plan`` recorded in ``WORK/dataset_ref.json`` (None when
    neither is known; the folder may be gone)."""
    if data_dir is not None:
        return Path(data_dir)
    ref_file = WorkDir(work_dir).dataset_ref
    if not ref_file.is_file():
        return None
    try:
        return Path(json.loads(ref_file.read_text())["root"])
    except (ValueError, KeyError, TypeError):
        return None


def _find_label_file(folder: Path, case_id: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        p = folder / f"{case_id}{suffix}"
        if p.is_file():
            return p
    return None


class ReferenceLoader:
    """``case_id -> reference label ids (Z, Y, X)`` on the original grid, and each case's voxel spacing.

    Args:
        read: ``case_id -> (label ids, geometry of the original image)``.
    """

    def __init__(self, read: Callable[[str], tuple[np.ndarray, ImageGeometry]]) -> None:
        self._read = read
        self._spacing: dict[str, tuple[float, ...]] = {}

    def __call__(self, case_id: str) -> np.ndarray:
        """The reference label ids of ``case_id`` (its spacing is remembered for :meth:`spacing`)."""
        labels, geometry = self._read(case_id)
        self._spacing[case_id] = tuple(float(s) for s in geometry.spacing)
        return labels

    def spacing(self, case_id: str) -> tuple[float, ...]:
        """The voxel spacing (mm, the label map's axis order) of ``case_id`` (read once if not loaded yet)."""
        if case_id not in self._spacing:
            self(case_id)
        return self._spacing[case_id]


def reference_loader(work_dir: Path, plan: Plan, data_dir: str | Path | None = None) -> ReferenceLoader:
    """``case_id -> reference label ids (Z, Y, X)`` on the original grid (with :meth:`ReferenceLoader.spacing`).

    Looks in ``data_dir/labelsTr`` (default: the dataset recorded in ``WORK/dataset_ref.json`` by
    ``medseg plan``). If the dataset is no longer there, falls back to the preprocessed labels mapped back
    to the original grid (exact when no resampling was needed, nearest-neighbour approximate otherwise),
    with a warning.
    """
    root = dataset_root(work_dir, data_dir)
    labels_dir = root / "labelsTr" if root is not None else None
    if labels_dir is not None and labels_dir.is_dir():

        def load(case_id: str) -> tuple[np.ndarray, ImageGeometry]:
            path = _find_label_file(labels_dir, case_id)
            if path is None:
                raise MedsegError(f"{labels_dir}: no reference label for case {case_id}")
            return read_image(path)

        return ReferenceLoader(load)
    if data_dir is not None:
        raise MedsegError(f"{data_dir}: no labelsTr folder with the reference labels")
    logger.warning(
        "the dataset's labelsTr folder was not found (%s); using the preprocessed labels mapped back "
        "to the original grid as references",
        labels_dir,
    )

    def load_preprocessed(case_id: str) -> tuple[np.ndarray, ImageGeometry]:
        _, seg, props = load_case(work_dir, plan, plan.default_configuration, case_id)
        if seg is None:
            raise MedsegError(f"case {case_id}: the preprocessed cache has no label")
        labels = classes_to_labels(
            revert_to_original(seg, props, is_seg=True), plan.label_ids, ignore_label=plan.ignore_label
        )
        return labels, props.geometry

    return ReferenceLoader(load_preprocessed)
