"""``OUT/quality.json`` of ``medseg predict``, the uncertainty maps of ``--uncertainty`` and calibrated probabilities.

:class:`QualityWriter` is a :data:`~medseg.inference.case_output.CaseHook`. For each finished case it reads the
mean class probabilities one class at a time (:attr:`~medseg.inference.case_output.FinishedCase.class_probability`),
applies the temperature find-best fitted (:mod:`medseg.postprocessing.calibration`; 1 without it), accumulates
the normalised predictive entropy (:func:`~medseg.postprocessing.quality_features.entropy_terms`: one pass
over the classes, each class's probability built once and never all classes at once; of each foreground label
only a box around its mask is kept until the normaliser is complete), computes the per-label features and the
case's verdict (:mod:`medseg.postprocessing.quality_features`) and rewrites ``quality.json`` atomically::

    {"format": "medseg-quality-v1", "temperature": 1.3, "score_model": {...},
     "cases": {"CASE": {"segmentation": "CASE.nii.gz", "score": 0.87, "expected_dice": 0.88,
                        "verdict": "ok" | "review", "reasons": [...], "warnings": [...],
                        "uncertainty": "uncertainty/CASE.nii.gz" | null,
                        "volume_distance": {"mahalanobis2": 3.1, "threshold": 18.5, "labels": ["1", ...]} | null,
                        "labels": {"1": {"name": "liver", "voxels": 812, "volume_ml": 0.97, "components": 1,
                                         "expected_dice": 0.9, "uncertainty_inside": 0.02,
                                         "uncertainty_border": 0.4, "volume_z": -0.3}, ...}}}}

With ``uncertainty`` the entropy map (float32 in [0, 1], 0 where every member and TTA pass agrees with
certainty) is written as ``OUT/uncertainty/CASE.nii.gz`` in the input's geometry; with ``save_probabilities``
the predictor's ``OUT/CASE.npz`` is rewritten with the calibrated probabilities (when ``T != 1``). Cases of
earlier runs are kept; a shard writes ``quality.part-K-of-N.json``, merged like ``statistics.json``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.inference.case_output import FinishedCase
from medseg.inference.case_table import CaseTable
from medseg.inference.export import write_probabilities
from medseg.inference.shards import Shard
from medseg.io.image import strip_suffix, voxel_ml, write_like
from medseg.postprocessing.quality_features import (
    ABSENT_BELOW,
    NEAR_MARGIN,
    QualityModel,
    case_verdict,
    entropy_terms,
    label_features,
)

__all__ = ["QUALITY_FILE", "QUALITY_FORMAT", "UNCERTAINTY_DIR", "QualityWriter", "uncertainty_path"]

logger = logging.getLogger(__name__)

QUALITY_FILE = "quality.json"
QUALITY_FORMAT = "medseg-quality-v1"
#: Subfolder of the output folder holding the uncertainty maps (``CASE.nii.gz``).
UNCERTAINTY_DIR = "uncertainty"
_SKIPPED = "its segmentation existed and was not predicted again (rerun with --overwrite to assess it)"
#: Where a label's calibrated probability is kept: a box of the grid (one slice per axis) or flat voxel indices.
Box = tuple[slice, ...] | np.ndarray


def _near_box(box: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``box`` (a label's bounding box) widened by ``NEAR_MARGIN + 1`` voxels per side within ``shape``: every
    voxel the features look at (the near band of the expected Dice, the surface band) lies inside it, and the
    mask never touches its sides except at the grid's, so the morphology on the crop equals that on the grid."""
    pad = NEAR_MARGIN + 1
    return tuple(slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(box, shape))


def _crop(array: np.ndarray, box: Box) -> np.ndarray:
    """``array`` (the grid ``(Z, Y, X)``) on ``box``: a crop for slices, a flat selection for indices."""
    return array.reshape(-1)[box] if isinstance(box, np.ndarray) else array[box]


def uncertainty_path(output_dir: Path, case_id: str) -> Path:
    """``OUT/uncertainty/CASE.nii.gz``, where ``--uncertainty`` writes a case's map."""
    return Path(output_dir) / UNCERTAINTY_DIR / f"{case_id}.nii.gz"


class QualityWriter:
    """Scores each predicted case, keeps ``OUT/quality.json`` current, writes uncertainty maps on request.

    Args:
        output_dir: the prediction output folder.
        calibration: find-best's stored fit (``postprocessing.json``'s ``calibration`` and ``quality``
            entries), or None: temperature 1 and the heuristic score.
        names: label id -> name.
        uncertainty: write ``OUT/uncertainty/CASE.nii.gz``.
        save_probabilities: rewrite the predictor's ``OUT/CASE.npz`` with calibrated probabilities.
        shard: this process's share of the cases (it writes its part file), or None.
        review_below: the user's acceptance level: a case whose score (predicted mean foreground Dice) is
            below it gets the verdict ``review``, in place of the model's own threshold (find-best's: its
            cross-validation median minus 0.07, i.e. unusual *for this model*); None keeps the model's.
            ``quality.json`` records which one applied (``score_model.review_below_source``).

    Attributes:
        cases: case id -> its ``quality.json`` entry (this run's and earlier ones).
        written: case ids this run scored.
    """

    def __init__(
        self,
        output_dir: Path,
        calibration: Mapping[str, Any] | None = None,
        names: Mapping[int, str] | None = None,
        uncertainty: bool = False,
        save_probabilities: bool = False,
        shard: Shard | None = None,
        review_below: float | None = None,
    ) -> None:
        fitted = dict(calibration or {})
        self.output_dir = Path(output_dir)
        self.temperature = float((fitted.get("calibration") or {}).get("temperature", 1.0))
        self.model = QualityModel.from_dict(fitted.get("quality"))
        self.review_below_source = self.model.source
        if review_below is not None:
            if not 0.0 <= review_below <= 1.0:
                raise MedsegError(f"--review-below {review_below}: a Dice between 0 and 1 is needed")
            self.model = replace(self.model, review_below=float(review_below))
            self.review_below_source = "user (--review-below)"
        self.names = dict(names or {})
        self.uncertainty = uncertainty
        self.save_probabilities = save_probabilities
        self.shard = shard
        self.table = CaseTable(
            self.output_dir / QUALITY_FILE, QUALITY_FORMAT, "quality report", shard, document=self._document
        )
        self.path, self.cases = self.table.path, self.table.cases
        self.written: list[str] = []

    def __call__(self, case: FinishedCase) -> None:
        """Score ``case``, write its uncertainty map / calibrated probabilities if asked, rewrite the file.

        Raises:
            MedsegError: a file cannot be written.
        """
        ml_per_voxel = voxel_ml(case.geometry.spacing)
        if case.class_probability is not None:
            entropy, calibrated = self._calibrated(case)
        else:
            entropy, calibrated = None, {}
        labels: dict[str, Any] = {}
        for label in case.label_ids[1:]:
            volumes = self.model.volumes.get(str(label))
            if label in calibrated:
                box, q = calibrated[label]
                assert entropy is not None
                features = label_features(
                    _crop(case.labels, box) == label, q, _crop(entropy, box), ml_per_voxel, volumes
                )
            else:  # region plans: no probabilities
                features = label_features(case.labels == label, None, None, ml_per_voxel, volumes)
            labels[str(label)] = {"name": self.names.get(label, ""), **features}
        warnings = list(getattr(case, "input_warnings", ()) or ())
        entry: dict[str, Any] = {"segmentation": case.segmentation_path.name}
        entry.update(case_verdict(labels, self.model, warnings))
        if case.class_probability is None:
            entry["reasons"].append("no class probabilities (region-based plan): no score")
            entry["verdict"] = "review"
        entry["warnings"] = warnings
        entry["uncertainty"] = None
        if self.uncertainty and entropy is not None:
            target = uncertainty_path(self.output_dir, case.case_id)
            try:
                write_like(entropy.astype(np.float32), case.reference, target, geometry=case.geometry)
            except (OSError, ValueError) as exc:
                raise MedsegError(f"{target}: cannot write the uncertainty map ({exc})") from None
            entry["uncertainty"] = f"{UNCERTAINTY_DIR}/{target.name}"
        entry["labels"] = labels
        self._record(case.case_id, entry)
        logger.info("%s: quality %s (%s)", case.case_id, entry["verdict"], "; ".join(entry["reasons"]) or "no reasons")

    def _calibrated(self, case: FinishedCase) -> tuple[np.ndarray, dict[int, tuple[Box, np.ndarray]]]:
        """The normalised entropy and what the features need of each foreground label's calibrated probability,
        from one pass over the classes (each class's probability is built once on the original grid).

        A present label keeps its tempered power ``p^(1/T)`` on a box around its mask (:func:`_near_box`), an
        absent one on the voxels where its calibrated probability could reach
        :data:`~medseg.postprocessing.quality_features.ABSENT_BELOW` (all its features need); both are divided
        by the normaliser once every class has been added. With ``save_probabilities`` (and ``T != 1``) every
        class is kept whole and ``OUT/CASE.npz`` is rewritten with the calibrated probabilities.

        Returns:
            The normalised entropy ``(Z, Y, X)`` in [0, 1]; foreground label -> (box, its calibrated probability
            ``q`` on the box: a crop of the grid, or for an absent label a flat index array into it with ``q``
            on those voxels).

        Raises:
            MedsegError: the calibrated probabilities cannot be written.
        """
        assert case.class_probability is not None
        save = self.save_probabilities and self.temperature != 1.0
        boxes = ndimage.find_objects(case.labels, max_label=max(case.label_ids))
        kept: dict[int, tuple[Box, np.ndarray]] = {}
        whole: dict[int, np.ndarray] = {}
        norm = s1 = None
        for label in case.label_ids:
            powered, weighted = entropy_terms(case.class_probability(label), self.temperature)
            norm = powered if norm is None else norm + powered
            s1 = weighted if s1 is None else s1 + weighted
            if save:
                whole[label] = powered
            if label == case.label_ids[0]:
                continue
            box = boxes[label - 1] if 0 < label <= len(boxes) else None
            if box is not None:
                box = _near_box(box, case.labels.shape)
                kept[label] = (box, powered[box].copy())  # a copy: the class's full volume is freed
            else:  # q = powered / final norm <= powered / norm so far: a superset of the voxels that may reach it
                where = np.flatnonzero(powered >= np.float32(ABSENT_BELOW / 2) * norm)
                kept[label] = (where, powered.reshape(-1)[where])
        assert norm is not None and s1 is not None
        norm = np.maximum(norm, np.float32(1e-30))
        entropy = np.log(norm) - s1 / np.float32(self.temperature) / norm
        entropy = np.clip(entropy / np.float32(math.log(len(case.label_ids))), 0.0, 1.0).astype(np.float32)
        calibrated = {label: (box, powered / _crop(norm, box)) for label, (box, powered) in kept.items()}
        if save:
            npz = case.segmentation_path.with_name(strip_suffix(case.segmentation_path.name) + ".npz")
            stacked = np.stack([whole[label] / norm for label in case.label_ids])
            try:
                write_probabilities(npz, stacked, case.label_ids)
            except OSError as exc:
                raise MedsegError(f"{npz}: cannot write the calibrated probabilities ({exc})") from None
        return entropy, calibrated

    def _record(self, case_id: str, entry: Mapping[str, Any]) -> None:
        self.table.record({case_id: dict(entry)})
        self.written.append(case_id)

    def list_skipped(self, case_ids: Iterable[str]) -> list[str]:
        """Give every case of ``case_ids`` without an entry one (verdict ``review``: not assessed), so that
        ``quality.json`` lists every case of the folder.

        Returns:
            The cases added.
        """
        added = [c for c in case_ids if c not in self.cases]
        if added:
            entry: dict[str, Any] = {
                "score": None,
                "verdict": "review",
                "reasons": [_SKIPPED],
                "warnings": [],
                "labels": {},
            }
            self.table.record({c: dict(entry) for c in added})
        return added

    def merge_parts(self) -> bool:
        """Fold the shards' ``quality.part-K-of-N.json`` into ``quality.json``; True when there were parts."""
        return self.table.merge_parts()

    def _document(self, cases: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "format": QUALITY_FORMAT,
            "temperature": self.temperature,
            "score_model": {
                **{k: v for k, v in self.model.to_dict().items() if k not in ("volumes", "joint_volumes")},
                "review_below_source": self.review_below_source,
            },
            "cases": dict(cases),
        }
