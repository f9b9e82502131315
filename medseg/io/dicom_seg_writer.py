"""Write a label map as a DICOM Segmentation (SEG) of the image series it was predicted on (highdicom).

:func:`write_dicom_seg` writes one BINARY segmentation object with one segment per label present in the map
(segment numbers ``1..n`` in increasing label-id order; DICOM requires consecutive segment numbers, so label ids
with gaps are renumbered and the segment *labels* carry the ``dataset.json`` names). Each segment has the SNOMED CT
category/type and colour of :mod:`medseg.io.dicom_segments`, algorithm type AUTOMATIC and an algorithm
identification (name, version, family *Artificial Intelligence*, parameter ``model`` = the model's identity).
Frames are written only where a segment is present, each referencing its source image (``SOPInstanceUID``) and
carrying its plane position, so viewers (3D Slicer, OHIF) and highdicom place it on the source series.

Slice order: ``labels[k]`` belongs to the ``k``-th source slice sorted along the slice normal
(:func:`medseg.io.dicom_slices.read_source_slices`, SimpleITK's series order).

An empty label map (no foreground) has no segment to describe and a SEG without segments is not a valid object:
nothing is written, the function returns None and logs one line saying so.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import medseg
from medseg.errors import DicomError
from medseg.io.dicom_segments import describe_label
from medseg.io.dicom_slices import SourceSlices, read_source_slices
from medseg.io.image import atomic_write_stream

__all__ = ["SegWritten", "write_dicom_seg"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegWritten:
    """What :func:`write_dicom_seg` wrote.

    Attributes:
        path: the SEG file.
        segments: label id -> segment number.
        frames: number of frames written (one per segment and slice where the segment is present).
    """

    path: Path
    segments: dict[int, int]
    frames: int


def write_dicom_seg(
    labels: np.ndarray,
    source_files: Sequence[Path | str] | SourceSlices,
    label_names: Mapping[int, str],
    out_path: Path,
    *,
    algorithm_name: str = "medseg",
    algorithm_version: str = medseg.__version__,
    model_id: str,
    series_description: str | None = None,
    series_number: int | None = None,
) -> SegWritten | None:
    """Write ``labels`` as a DICOM SEG of the series ``source_files``.

    Args:
        labels: label map ``(Z, Y, X)`` of label ids (0 = background) on the source grid, ``Z`` in slice order
            along the normal, ``Y`` rows and ``X`` columns of the source pixel data.
        source_files: the source series' single-frame image files (any order), or the series already read.
        label_names: label id -> name (``dataset.json``); a present id without a name is called ``label <id>``.
        out_path: the SEG file to write (atomically: a temporary file renamed into place).
        algorithm_name, algorithm_version: the algorithm identification of every segment.
        model_id: the model's identity (e.g. dataset, configurations and folds, model path); recorded as the
            algorithm parameter ``model`` and in the content description.
        series_description: the SEG series' description (default ``"<algorithm_name> segmentation"``).
        series_number: the SEG series' number (default: the source series' number + 1000).

    Returns:
        What was written, or None for an empty label map (nothing written).

    Raises:
        DicomError: the source files are not one single-frame series, the label map is not on their grid, or
            highdicom refuses the object.
    """
    slices = source_files if isinstance(source_files, SourceSlices) else read_source_slices(source_files)
    labels = np.asarray(labels)
    slices.check_labels(labels, str(out_path))
    present = [int(v) for v in np.unique(labels) if v != 0]
    if any(v < 0 for v in present):
        raise DicomError(f"{out_path}: negative label ids {[v for v in present if v < 0]} cannot be written")
    if not present:
        logger.info("%s: no foreground in the label map; a SEG needs at least one segment, none written", out_path)
        return None
    segments = {label: number for number, label in enumerate(present, start=1)}
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm_version[:64],
        parameters={"model": model_id[:64]},
    )
    descriptions = []
    for label, number in segments.items():
        described = describe_label(label, label_names.get(label, f"label {label}"))
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=described.name[:64],
                segmented_property_category=described.category,
                segmented_property_type=described.type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*described.rgb),
            )
        )
    mapped = np.zeros(labels.shape, dtype=np.uint16)
    for label, number in segments.items():
        mapped[labels == label] = number
    sources = [_without_empty_charset(ds) for ds in slices.datasets]
    source = sources[0]
    try:
        with warnings.catch_warnings():
            # highdicom warns about single-component patient names, which real headers often have
            warnings.filterwarnings("ignore", message=".*intended person name")
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=mapped,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=series_number or (int(source.get("SeriesNumber", 0) or 0) + 1000),
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=algorithm_name[:64],
                manufacturer_model_name=model_id[:64],
                software_versions=algorithm_version[:64],
                device_serial_number=hashlib.sha1(model_id.encode()).hexdigest()[:16],
                content_label="MEDSEG",
                content_description=f"{algorithm_name} {algorithm_version}: {model_id}"[:64],
                content_creator_name=algorithm_name[:64],
                omit_empty_frames=True,
            )
    except (ValueError, TypeError, AttributeError) as exc:
        raise DicomError(f"{out_path}: highdicom cannot build the SEG ({exc})") from None
    seg.SeriesDescription = (series_description or f"{algorithm_name} segmentation")[:64]
    out_path = Path(out_path)
    atomic_write_stream(out_path, lambda fh: pydicom.dcmwrite(fh, seg, enforce_file_format=True), ".dcm")
    frames = int(seg.NumberOfFrames)
    logger.info("%s: DICOM SEG with %d segment(s), %d frame(s)", out_path.name, len(segments), frames)
    return SegWritten(out_path, segments, frames)


def _without_empty_charset(ds: Dataset) -> Dataset:
    """``ds``, or a copy without an empty ``SpecificCharacterSet`` (its default, which highdicom refuses to copy)."""
    if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
        ds = copy.copy(ds)
        del ds.SpecificCharacterSet
    return ds
