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

import logging
from pathlib import Path

from medseg.errors import MedsegError
from medseg.inference.case_output import FinishedCase
from medseg.inference.case_table import CaseTable
from medseg.inference.export import write_segmentation
from medseg.inference.shards import Shard
from medseg.io.codec import to_json_dict
from medseg.io.image import instance_map_path
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
        self.table = CaseTable(self.output_dir / INSTANCES_FILE, INSTANCES_FORMAT, "instance table", shard)
        self.path, self.cases = self.table.path, self.table.cases
        self.written: list[str] = []

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
        self.table.record({case.case_id: entry})
        self.written.append(case.case_id)
        logger.info("%s: %d instance(s) -> %s", case.case_id, len(table), target.name)

    def merge_parts(self) -> bool:
        """Fold the shards' ``instances.part-K-of-N.json`` into ``instances.json`` (atomically) and remove them.

        Returns:
            True when there were parts to merge.
        """
        return self.table.merge_parts()
