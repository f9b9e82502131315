"""The statistics outputs of ``medseg predict --statistics``: ``OUT/statistics.json`` and ``OUT/statistics.csv``.

:class:`StatisticsWriter` is a :data:`~medseg.inference.case_output.CaseHook` for
:func:`~medseg.inference.folder.predict_folder`: for each finished case it reads the input image (first
channel, :attr:`~medseg.inference.case_output.FinishedCase.reference`), computes the per-structure numbers of
:mod:`medseg.postprocessing.structure_statistics` for every label of the model (absent ones with volume 0) and
rewrites both files atomically (tmp + rename) after every case. Cases of earlier runs in the same output
folder are kept (a rerun replaces only the rows of the cases it computes)::

    {"format": "medseg-statistics-v1",
     "connectivity": "full: 26 neighbours in 3D, 8 in 2D (face, edge or vertex)",
     "intensity": "first input channel (Hounsfield units for CT)",
     "cases": {"CASE": {"segmentation": "CASE.nii.gz", "image": "CASE_0000.nii.gz", "source": "predicted",
                        "spacing_mm": [z, y, x],
                        "structures": [{"label": 1, "name": "liver", "voxels": 812, "volume_ml": 0.97,
                                        "components": 1, "bbox_min_mm": [x, y, z], "bbox_max_mm": [x, y, z],
                                        "bbox_size_mm": [x, y, z], "intensity_mean": 61.2,
                                        "intensity_std": 9.8}, ...]}}}

``source`` is ``predicted`` for a case segmented by this run, ``existing segmentation`` for a case whose
output existed and whose numbers were computed from that file. The CSV has one row per case and label
(:data:`CSV_COLUMNS`; world coordinates split into ``_x``/``_y``/``_z`` columns, empty when absent).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medseg.inference.case_output import FinishedCase
from medseg.inference.case_table import CaseTable
from medseg.inference.shards import Shard
from medseg.io.codec import to_json_dict
from medseg.postprocessing.case_reports import read_case_image
from medseg.postprocessing.structure_statistics import CONNECTIVITY, structure_statistics

__all__ = [
    "CSV_COLUMNS",
    "STATISTICS_CSV",
    "STATISTICS_FILE",
    "STATISTICS_FORMAT",
    "StatisticsWriter",
    "statistics_csv",
]

logger = logging.getLogger(__name__)

STATISTICS_FILE = "statistics.json"
STATISTICS_CSV = "statistics.csv"
STATISTICS_FORMAT = "medseg-statistics-v1"
PREDICTED = "predicted"
EXISTING = "existing segmentation"

_AXES = ("x", "y", "z")
#: The CSV header: one row per case and label.
CSV_COLUMNS: tuple[str, ...] = (
    "case",
    "label",
    "name",
    "voxels",
    "volume_ml",
    "components",
    *(f"bbox_{corner}_{a}_mm" for corner in ("min", "max", "size") for a in _AXES),
    "intensity_mean",
    "intensity_std",
)


class StatisticsWriter:
    """Computes each predicted case's per-structure statistics and keeps ``OUT/statistics.{json,csv}`` current.

    Args:
        output_dir: the prediction output folder.
        names: label id -> name (from the plan / dataset.json).
        shard: the share of the cases this process predicts (``--part K/N`` or a ``torchrun`` rank): it writes
            only ``statistics.part-K-of-N.json``, folded into both files by :meth:`merge_parts`; None = both
            files, after merging the parts earlier shards left there.

    Attributes:
        cases: case id -> its ``statistics.json`` entry (this run's cases and the earlier ones kept).
        written: case ids whose statistics this run computed.
    """

    def __init__(self, output_dir: Path, names: Mapping[int, str] | None = None, shard: Shard | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.names = dict(names or {})
        self.csv_path = self.output_dir / STATISTICS_CSV
        self.table = CaseTable(
            self.output_dir / STATISTICS_FILE,
            STATISTICS_FORMAT,
            "statistics",
            shard,
            document=_document,
            derived=lambda cases: [(self.csv_path, statistics_csv(cases))],  # a shard's CSV: when merged
        )
        # cases: what the folder holds, for missing(): the main file's and every part's
        self.path, self.cases = self.table.path, self.table.cases
        self.written: list[str] = []

    def __call__(self, case: FinishedCase) -> None:
        """Compute and record the statistics of a case this run predicted (called on a writer thread).

        Raises:
            MedsegError: the input image is unreadable or of another shape, or a file cannot be written.
        """
        self.record(case, PREDICTED)

    def missing(self, case_ids: Iterable[str]) -> list[str]:
        """The cases of ``case_ids`` that have no statistics yet (neither from this run nor an earlier one)."""
        return [c for c in case_ids if c not in self.cases]

    def revisit(self, case: FinishedCase) -> None:
        """Compute and record the statistics of a case whose segmentation existed (``source``: existing)."""
        self.record(case, EXISTING)

    def record(self, case: FinishedCase, source: str = PREDICTED) -> None:
        """Compute the statistics of ``case`` and rewrite both files.

        Args:
            case: the label map, its geometry, the model's label ids and the input image's path.
            source: where the label map came from (:data:`PREDICTED` or :data:`EXISTING`), recorded.

        Raises:
            MedsegError: as :meth:`__call__`.
        """
        image = read_case_image(case)
        rows = structure_statistics(case.labels, case.geometry, case.label_ids, self.names, image)
        entry = {
            "segmentation": case.segmentation_path.name,
            "image": case.reference.name,
            "source": source,
            "spacing_mm": list(case.geometry.spacing),
            "structures": [to_json_dict(r) for r in rows],
        }
        self.table.record({case.case_id: entry})
        self.written.append(case.case_id)
        present = sum(1 for r in rows if r.voxels)
        logger.info("%s: statistics of %d label(s), %d present", case.case_id, len(rows), present)

    def merge_parts(self) -> bool:
        """Fold the shards' ``statistics.part-K-of-N.json`` into ``statistics.json`` and rewrite the CSV from it.

        Returns:
            True when there were parts to merge.

        Raises:
            MedsegError: the CSV cannot be written.
        """
        return self.table.merge_parts()


def _document(cases: Mapping[str, Any]) -> dict[str, Any]:
    """The ``statistics.json`` document of ``cases``."""
    return {
        "format": STATISTICS_FORMAT,
        "connectivity": CONNECTIVITY,
        "intensity": "first input channel (Hounsfield units for CT)",
        "cases": dict(cases),
    }


def statistics_csv(cases: Mapping[str, Any]) -> str:
    """The CSV text of ``statistics.json``'s ``cases``: a header (:data:`CSV_COLUMNS`), one row per case and label.

    Args:
        cases: case id -> entry with ``structures`` (as written by :class:`StatisticsWriter`).
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for case_id, entry in cases.items():
        for s in entry.get("structures", []):
            corners = []
            for key in ("bbox_min_mm", "bbox_max_mm", "bbox_size_mm"):
                values = list(s.get(key) or [])
                corners += [_cell(values[i]) if i < len(values) else "" for i in range(len(_AXES))]
            writer.writerow(
                [
                    case_id,
                    s.get("label"),
                    s.get("name"),
                    s.get("voxels"),
                    _cell(s.get("volume_ml")),
                    s.get("components"),
                    *corners,
                    _cell(s.get("intensity_mean")),
                    _cell(s.get("intensity_std")),
                ]
            )
    return buf.getvalue()


def _cell(value: float | None) -> str:
    return "" if value is None else repr(float(value))
