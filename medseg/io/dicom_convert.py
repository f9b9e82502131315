"""``medseg convert``: DICOM image series with SEG/RTSTRUCT annotations -> a training dataset folder.

Every image series under the DICOM folder that one annotation object (DICOM SEG or RTSTRUCT, matched by the
series it references, else by a frame of reference only that series has) annotates becomes a training case:
``imagesTr/<case>_0000.nii.gz`` (the series read by :func:`~medseg.io.dicom_series.read_series_image`, its
geometry kept exactly) and ``labelsTr/<case>.nii.gz`` (the annotation's segments as label ids on the same
grid), listed in ``dataset.json`` (nnU-Net v2 form, channel named after the series' modality).

Label ids come from the segment names, the same name the same id in every case, numbered in order of first
appearance (cases sorted by case id, segments in the object's order). Segments that overlap are refused with
a message naming them, unless region-based labels are asked for (:class:`~medseg.options.SegmentOverlaps`):
then each combination of segments that occurs gets a label id and each segment becomes a region, the set of
ids whose combination holds it (:mod:`medseg.io.regions`). Bad series and annotations are reported one line
each; the others are converted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.io.dicom_annotations import ANNOTATION_READERS, SegmentMasks
from medseg.io.dicom_series import DicomObject, DicomScan, DicomSeries, read_series_image, scan_dicom_folder
from medseg.io.image import atomic_write_text, write_image
from medseg.options import SegmentOverlaps

logger = logging.getLogger(__name__)

_IMAGES, _LABELS, _JSON, _ENDING = "imagesTr", "labelsTr", "dataset.json", ".nii.gz"


@dataclass
class ConvertResult:
    """Outcome of :func:`convert_dicom`.

    Attributes:
        dataset_dir: the dataset folder written.
        written: case ids converted.
        failed: series, file or annotation -> message.
        skipped: one line per object or series left out on purpose (no annotation, not an annotation kind).
        labels: the ``labels`` entry of the dataset.json written.
    """

    dataset_dir: Path
    written: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failed

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"converted {len(self.written)} case(s) into {self.dataset_dir}"]
        if self.skipped:
            lines[0] += f"; {len(self.skipped)} object(s)/series left out"
        if self.failed:
            lines[0] += f"; {len(self.failed)} FAILED:"
            lines += [f"  {msg}" for msg in self.failed.values()]
        return "\n".join(lines)


class LabelTable:
    """Label ids of segment names (or of combinations of them, for region-based labels), shared by all cases."""

    def __init__(self, overlaps: SegmentOverlaps) -> None:
        self.overlaps = overlaps
        self.names: list[str] = []
        self.ids: dict[frozenset[str], int] = {}

    def _id(self, combination: frozenset[str]) -> int:
        for name in sorted(combination, key=lambda n: (n not in self.names, n)):
            if name not in self.names:
                self.names.append(name)
        if combination not in self.ids:
            self.ids[combination] = len(self.ids) + 1
        return self.ids[combination]

    def label_map(self, segments: SegmentMasks, source: Path) -> np.ndarray:
        """The label map ``(Z, Y, X)`` (uint8, or uint16 past 255 ids) of one annotation's segments.

        Raises:
            MedsegError: segments overlap (without region-based labels), naming each overlapping pair and
                its voxel count; more than 62 distinct segment names with region-based labels.
        """
        names = list(dict.fromkeys(segments.names))
        masks = np.stack(
            [np.any(segments.masks[..., [i for i, n in enumerate(segments.names) if n == name]], -1) for name in names],
            -1,
        )
        for name in names:
            self._id(frozenset([name]))
        counts = masks.sum(-1, dtype=np.int64)
        overlapping = bool((counts > 1).any())
        if overlapping and self.overlaps == SegmentOverlaps.ERROR:
            pairs = []
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    n = int(np.count_nonzero(masks[..., i] & masks[..., j]))
                    if n:
                        pairs.append(f"{names[i]!r} and {names[j]!r} ({n} voxels)")
            raise MedsegError(
                f"{source}: segments overlap: {', '.join(pairs)}; a label map holds one label per voxel - "
                "pass --overlaps regions for region-based labels, or fix the segmentation"
            )
        if len(names) > 62:
            raise MedsegError(f"{source}: {len(names)} segments; region-based conversion handles up to 62")
        code = np.zeros(masks.shape[:-1], dtype=np.int64)
        for i in range(len(names)):
            code |= masks[..., i].astype(np.int64) << i
        values, inverse = np.unique(code, return_inverse=True)
        lut = np.zeros(len(values), dtype=np.int64)
        for k, value in sorted(enumerate(values), key=lambda kv: (int(kv[1]).bit_count(), int(kv[1]))):
            if value:
                lut[k] = self._id(frozenset(n for i, n in enumerate(names) if (int(value) >> i) & 1))
        dtype = np.uint8 if len(self.ids) < 256 else np.uint16
        return lut[inverse.reshape(code.shape)].astype(dtype)

    def labels_json(self) -> tuple[dict[str, Any], list[int] | None]:
        """``labels`` for dataset.json and, for region-based labels, ``regions_class_order`` (else None)."""
        region_based = any(len(c) > 1 for c in self.ids)
        if not region_based:
            return {"background": 0, **{next(iter(c)): i for c, i in self.ids.items()}}, None
        labels: dict[str, Any] = {"background": 0}
        order = []
        for name in self.names:
            ids = sorted(i for c, i in self.ids.items() if name in c)
            labels[name] = ids
            order.append(self.ids.get(frozenset([name]), ids[0]))
        return labels, order


def _annotated_series(scan: DicomScan, result: ConvertResult) -> list[tuple[DicomSeries, DicomObject]]:
    by_uid = {s.series_uid: s for s in scan.series}
    by_frame: dict[str, list[DicomSeries]] = {}
    for s in scan.series:
        by_frame.setdefault(s.frame_of_reference_uid, []).append(s)
    found: dict[str, list[DicomObject]] = {}
    for obj in scan.objects:
        if obj.modality not in ANNOTATION_READERS:
            result.skipped.append(f"{obj.path}: skipped, a {obj.kind} object ({obj.modality}) is no annotation")
            continue
        target = next((by_uid[u] for u in obj.referenced_series_uids if u in by_uid), None)
        frame = by_frame.get(obj.frame_of_reference_uid, []) if obj.frame_of_reference_uid else []
        if target is None and len(frame) == 1:
            target = frame[0]
        if target is not None:
            found.setdefault(target.series_uid, []).append(obj)
        elif not any(u in scan.failed_series_uids for u in obj.referenced_series_uids):
            refs = ", ".join(obj.referenced_series_uids) or "none"
            result.failed[str(obj.path)] = (
                f"{obj.path}: its image series (referenced: {refs}) is not in the folder; nothing to convert"
            )
    pairs = []
    for s in scan.series:
        objs = found.get(s.series_uid, [])
        if not objs:
            result.skipped.append(f"series {s.case_id}: no SEG/RTSTRUCT annotates it; left out")
        elif len(objs) > 1:
            names = ", ".join(str(o.path) for o in objs)
            result.failed[s.case_id] = (
                f"series {s.case_id}: {len(objs)} annotation objects ({names}); keep one per series"
            )
        else:
            pairs.append((s, objs[0]))
    return pairs


def convert_dicom(
    dicom_dir: str | Path,
    dataset_dir: str | Path,
    overlaps: SegmentOverlaps | str = SegmentOverlaps.ERROR,
    overwrite: bool = False,
) -> ConvertResult:
    """Convert the annotated DICOM series under ``dicom_dir`` into a dataset folder ``dataset_dir``.

    Args:
        dicom_dir: folder (searched recursively) of DICOM image series and their SEG/RTSTRUCT objects.
        dataset_dir: the dataset folder to write (``imagesTr/``, ``labelsTr/``, ``dataset.json``).
        overlaps: ``error`` (refuse overlapping segments) or ``regions`` (region-based labels).
        overwrite: write into a folder that already holds a dataset.json.

    Returns:
        The :class:`ConvertResult` (``ok`` False when a series or annotation failed).

    Raises:
        MedsegError: a missing DICOM folder, a dataset folder inside it or already holding a dataset.json
            (without ``overwrite``), or no case converted at all (the message lists why).
    """
    src, out = Path(dicom_dir), Path(dataset_dir)
    mode = SegmentOverlaps(overlaps)
    if not src.is_dir():
        raise MedsegError(f"{src}: DICOM folder not found")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise MedsegError(f"{out}: the dataset folder must not be inside the DICOM folder {src}")
    if (out / _JSON).exists() and not overwrite:
        raise MedsegError(f"{out / _JSON} exists; choose a new dataset folder or pass --overwrite")
    scan = scan_dicom_folder(src)
    result = ConvertResult(dataset_dir=out)
    result.failed.update(scan.failed)
    pairs = _annotated_series(scan, result)
    table = LabelTable(mode)
    modality = pairs[0][0].modality if pairs else ""
    training = []
    for series, obj in pairs:
        try:
            if series.modality != modality:
                raise MedsegError(
                    f"series {series.case_id}: modality {series.modality}, the dataset's first case is {modality}"
                )
            image, geometry = read_series_image(series)
            segments = ANNOTATION_READERS[obj.modality](obj.path, series)
            if segments.masks.shape[:-1] != image.shape:
                raise MedsegError(
                    f"{obj.path}: annotation grid {list(segments.masks.shape[:-1])} differs from series "
                    f"{series.case_id} {list(image.shape)}"
                )
            labels = table.label_map(segments, obj.path)
        except MedsegError as exc:
            result.failed[series.case_id] = str(exc)
            continue
        write_image(image, geometry, out / _IMAGES / f"{series.case_id}_0000{_ENDING}")
        write_image(labels, geometry, out / _LABELS / f"{series.case_id}{_ENDING}")
        training.append(
            {"image": f"./{_IMAGES}/{series.case_id}_0000{_ENDING}", "label": f"./{_LABELS}/{series.case_id}{_ENDING}"}
        )
        result.written.append(series.case_id)
        logger.info("%s: converted (%s, %d segment(s))", series.case_id, obj.modality, len(segments.names))
    for line in result.skipped:
        logger.info(line)
    if not result.written:
        why = "; ".join(result.failed.values()) or "no DICOM image series with a SEG/RTSTRUCT annotation found"
        raise MedsegError(f"{src}: no case converted ({why})")
    labels_json, order = table.labels_json()
    meta: dict[str, Any] = {
        "name": out.resolve().name,
        "description": f"converted from DICOM by medseg convert ({src.resolve()})",
        "channel_names": {"0": modality or "image"},
        "labels": labels_json,
        "numTraining": len(training),
        "file_ending": _ENDING,
        "training": training,
    }
    if order is not None:
        meta["regions_class_order"] = order
    atomic_write_text(out / _JSON, json.dumps(meta, indent=2) + "\n")
    result.labels = labels_json
    return result


__all__ = ["ConvertResult", "LabelTable", "convert_dicom"]
