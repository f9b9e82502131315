"""The instance outputs of ``medseg predict --instances``: an instance map per case and ``instances.json``.

:class:`InstanceWriter` is a :data:`~medseg.inference.case_output.CaseHook` for
:func:`~medseg.inference.folder.predict_folder`: for each finished case it builds the instance map of the
(postprocessed) label map with :func:`~medseg.postprocessing.instances.find_instances`, scoring each object
with the ensemble's mean probability of its class, and writes

- ``OUT/CASE_instances<ending>`` (e.g. ``CASE_instances.nii.gz``): object ids (uint16, or uint32 beyond
  65535 objects; 0 = background) with exactly the input's geometry, beside the semantic ``OUT/CASE<ending>``
  and before it (so a written semantic map implies its instance map);
- ``OUT/instances.json``, rewritten atomically after every case (earlier runs' cases are kept)::

    {"format": "medseg-instances-v1",
     "cases": {"CASE": {"instance_map": "CASE_instances.nii.gz", "segmentation": "CASE.nii.gz",
                        "options": {"connectivity": 3, "split_touching": false, "min_separation_mm": 10.0,
                                    "min_depth_mm": null},
                        "instances": [{"id": 1, "label": 2, "voxels": 812, "volume_ml": 0.97,
                                       "centroid_mm": [x, y, z], "bbox_min_mm": [x, y, z],
                                       "bbox_max_mm": [x, y, z], "score": 0.93}, ...]}}}

Positions are world coordinates in mm (SimpleITK/LPS physical space); ``score`` is null for region plans. A shard
of a split prediction (:class:`~medseg.inference.shards.Shard`) writes ``instances.part-K-of-N.json`` instead,
folded into ``instances.json`` by :meth:`InstanceWriter.merge_parts` (a writer without a shard merges on start).
Only the current case's probabilities are in memory at any time.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.inference.case_output import FinishedCase
from medseg.inference.export import write_segmentation
from medseg.inference.shards import Shard, merge_parts, merged_cases
from medseg.io.codec import to_json_dict
from medseg.io.image import atomic_write_text, instance_map_path
from medseg.io.json_files import read_case_table
from medseg.postprocessing.instances import InstanceOptions, find_instances

__all__ = ["INSTANCES_FILE", "INSTANCES_FORMAT", "InstanceWriter", "instance_map_path"]

logger = logging.getLogger(__name__)

INSTANCES_FILE = "instances.json"
INSTANCES_FORMAT = "medseg-instances-v1"


class InstanceWriter:
    """Writes each predicted case's instance map and keeps ``OUT/instances.json`` up to date.

    Args:
        output_dir: the prediction output folder.
        options: how objects are separated (:class:`~medseg.postprocessing.instances.InstanceOptions`).
        shard: the share of the cases this process predicts: its table is ``instances.part-K-of-N.json``;
            None = ``instances.json``, after merging the parts earlier shards left there.

    Attributes:
        path: the table this writer keeps.
        cases: case id -> its ``instances.json`` entry (this run's cases and the earlier ones kept, the other
            shards' included).
        written: case ids whose instances this run wrote.
    """

    def __init__(self, output_dir: Path, options: InstanceOptions | None = None, shard: Shard | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.options = options or InstanceOptions()
        main = self.output_dir / INSTANCES_FILE
        self.path = main if shard is None else shard.part_path(main)
        if shard is None:
            self.merge_parts()
        self._own: dict[str, Any] = _earlier_cases(self.path)
        self.cases: dict[str, Any] = {**_earlier_cases(main), **merged_cases(main)} if shard else dict(self._own)
        self.written: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, case: FinishedCase) -> None:
        """Find, write and record the instances of ``case`` (called on a writer thread).

        Raises:
            MedsegError: the instance map or ``instances.json`` cannot be written.
        """
        ids, table = find_instances(case.labels, case.geometry, self.options, case.class_probability)
        target = instance_map_path(case.segmentation_path)
        try:
            write_segmentation(ids, case.geometry, target, reference=case.reference)
        except OSError as exc:
            raise MedsegError(f"{target}: cannot write the instance map ({exc.strerror or exc})") from None
        entry = {
            "instance_map": target.name,
            "segmentation": case.segmentation_path.name,
            "options": to_json_dict(self.options),
            "instances": [to_json_dict(i) for i in table],
        }
        with self._lock:
            self.cases[case.case_id] = self._own[case.case_id] = entry
            self.written.append(case.case_id)
            document = {"format": INSTANCES_FORMAT, "cases": dict(sorted(self._own.items()))}
            try:
                atomic_write_text(self.path, json.dumps(document, indent=1) + "\n")
            except OSError as exc:
                raise MedsegError(f"{self.path}: cannot write the instance table ({exc.strerror or exc})") from None
        logger.info("%s: %d instance(s) -> %s", case.case_id, len(table), target.name)

    def merge_parts(self) -> bool:
        """Fold the shards' ``instances.part-K-of-N.json`` into ``instances.json`` (atomically) and remove them.

        Returns:
            True when there were parts to merge.
        """
        return merge_parts(
            self.output_dir / INSTANCES_FILE, lambda _, cases: {"format": INSTANCES_FORMAT, "cases": cases}
        )


def _earlier_cases(path: Path) -> dict[str, Any]:
    """The cases of an earlier table at ``path`` (empty when there is none; a warning when it is unusable)."""
    return read_case_table(path, INSTANCES_FORMAT, "instance table")
