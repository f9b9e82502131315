"""The training reference of the per-case quality verdict, from a work folder's ``fingerprint.json``.

Per foreground label its volume distribution (:class:`~medseg.postprocessing.quality_features.LabelVolumes`:
the ``|z| > 3``, missing-label and fragment rules) and, for the labels present in nearly every training case,
their joint log-volume statistics (:mod:`medseg.postprocessing.volume_distance`). ``medseg find-best`` stores
both in its quality fit; ``medseg predict`` without that fit (a ``--fold all`` run, a work folder never given to
find-best) builds the heuristic model with them (:func:`reference_quality_model`), so the volume rules hold
there too. Volumes in ml: voxel count times the case's voxel volume, as the fingerprint recorded them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.fingerprint import Fingerprint
from medseg.io.image import voxel_ml
from medseg.io.workdir import WorkDir
from medseg.postprocessing.quality_features import EXPECTED_PRESENT, LabelVolumes, QualityModel
from medseg.postprocessing.volume_distance import JointVolumes, fit_joint_volumes

__all__ = ["reference_quality_model", "training_volumes", "with_reference_quality"]


def training_volumes(work_dir: Path, label_ids: Sequence[int]) -> tuple[dict[str, LabelVolumes], JointVolumes | None]:
    """The training volume statistics of a work folder's labels.

    Args:
        work_dir: the work folder (its ``fingerprint.json`` is read).
        label_ids: the plan's label ids, background first (it is skipped).

    Returns:
        ``(label id (str) -> its volume distribution, joint statistics or None)``; ``({}, None)`` without a
        fingerprint. The joint statistics cover the labels present in at least ``EXPECTED_PRESENT`` of the
        cases (None when the joint rule is off: :func:`~medseg.postprocessing.volume_distance.fit_joint_volumes`).
    """
    path = WorkDir(work_dir).fingerprint
    if not path.is_file():
        return {}, None
    fingerprint = Fingerprint.load(path)
    foreground = [int(label) for label in label_ids[1:]]
    cases = [
        {str(label): case.class_voxel_counts.get(label, 0) * voxel_ml(case.spacing) for label in foreground}
        for case in fingerprint.cases
    ]
    volumes: dict[str, LabelVolumes] = {}
    for label in foreground:
        logs = [math.log(case[str(label)]) for case in cases if case[str(label)] > 0]
        if logs:
            components = max(
                (
                    len(c.class_component_sizes.get(label, ()))
                    for c in fingerprint.cases
                    if c.class_voxel_counts.get(label)
                ),
                default=0,
            )
            volumes[str(label)] = LabelVolumes(
                float(np.mean(logs)), float(np.std(logs)), len(logs) / max(1, fingerprint.num_cases), components
            )
    common = [label for label, v in volumes.items() if v.present_fraction >= EXPECTED_PRESENT]
    return volumes, fit_joint_volumes(cases, common)


def reference_quality_model(work_dir: Path, label_ids: Sequence[int]) -> QualityModel:
    """The heuristic quality model (score = expected Dice) with the work folder's training volume statistics."""
    volumes, joint = training_volumes(work_dir, label_ids)
    return QualityModel(volumes=volumes, joint_volumes=joint)


def with_reference_quality(rules: Mapping[str, Any], work_dir: Path, label_ids: Sequence[int]) -> dict[str, Any]:
    """``rules`` (postprocessing rules, possibly empty) with :func:`reference_quality_model` as their ``quality``
    entry where find-best fitted none; a fitted one is kept."""
    if rules.get("quality"):
        return dict(rules)
    return {**rules, "quality": reference_quality_model(work_dir, label_ids).to_dict()}
