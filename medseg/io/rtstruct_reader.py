"""Rasterise a DICOM RT Structure Set (RTSTRUCT) onto the grid of its image series (pydicom + skimage).

Each ``CLOSED_PLANAR`` contour is placed on a slice -- the one its ``ContourImageSequence`` references when that
slice is in the series, else the slice whose plane holds it (within half the smallest slice gap, or half the
slice thickness for a single slice) -- converted to fractional pixel indices with the slice's position,
orientation and pixel spacing, and filled with :func:`skimage.draw.polygon` (pixels whose centre lies inside).
The contours of one ROI on one slice combine by the even-odd rule, so a contour inside another is a hole.
Contours of other types (``POINT``, ``OPEN_PLANAR``, ...) enclose nothing and are skipped with one warning per
ROI.

:func:`rasterise_rtstruct_masks` gives one boolean mask per ROI (overlaps allowed, e.g. for region-based labels);
:func:`rasterise_rtstruct` gives one label map, ROI ``i`` (in ``StructureSetROISequence`` order) as label
``i + 1``, and refuses overlapping ROIs with an error that names them. Both use the slice order of
:func:`medseg.io.dicom_slices.read_source_slices` (ascending along the normal, SimpleITK's series order).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from skimage.draw import polygon

from medseg.errors import DicomError
from medseg.io.dicom_slices import SourceSlices, read_source_slices

__all__ = ["rasterise_rtstruct", "rasterise_rtstruct_masks"]

logger = logging.getLogger(__name__)


def rasterise_rtstruct_masks(
    rtstruct_path: Path | str, source_files: Sequence[Path | str]
) -> tuple[np.ndarray, list[str]]:
    """One mask per ROI of an RTSTRUCT on the grid of its image series.

    Args:
        rtstruct_path: the RTSTRUCT file.
        source_files: the image series' single-frame files (any order).

    Returns:
        ``(masks, names)``: boolean masks ``(R, Z, Y, X)``, ``Z`` in slice order along the normal, and the ROI
        names, both in ``StructureSetROISequence`` order.

    Raises:
        DicomError: the file is unreadable or not an RTSTRUCT, references another series, or has a contour on no
            slice of the series.
    """
    path = Path(rtstruct_path)
    ds = _read_rtstruct(path)
    slices = read_source_slices(source_files)
    _check_references(ds, slices, path)
    rois = list(ds.get("StructureSetROISequence", []))
    numbers = {int(roi.ROINumber): i for i, roi in enumerate(rois)}
    names = [str(roi.get("ROIName", "")) or f"ROI {roi.ROINumber}" for roi in rois]
    masks = np.zeros((len(rois), *slices.shape), dtype=bool)
    by_uid = {uid: k for k, uid in enumerate(slices.sop_instance_uids)}
    for item in ds.get("ROIContourSequence", []):
        number = int(item.ReferencedROINumber)
        if number not in numbers:
            raise DicomError(f"{path}: contours of ROI number {number}, which StructureSetROISequence does not list")
        index = numbers[number]
        skipped = set()
        for contour in item.get("ContourSequence", []):
            kind = str(contour.get("ContourGeometricType", ""))
            if kind != "CLOSED_PLANAR":
                skipped.add(kind or "untyped")
                continue
            points = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64).reshape(-1, 3)
            k = _slice_of(contour, points, slices, by_uid, f"{path}: ROI {names[index]!r}")
            rows, columns = slices.to_pixel(k, points)
            rr, cc = polygon(rows, columns, shape=(slices.rows, slices.columns))  # type: ignore[no-untyped-call]  # skimage
            masks[index, k, rr, cc] ^= True
        if skipped:
            logger.warning("%s: ROI %r: %s contour(s) enclose nothing, skipped", path, names[index], sorted(skipped))
    return masks, names


def rasterise_rtstruct(rtstruct_path: Path | str, source_files: Sequence[Path | str]) -> tuple[np.ndarray, list[str]]:
    """The ROIs of an RTSTRUCT as one label map on the grid of its image series.

    Args:
        rtstruct_path: the RTSTRUCT file.
        source_files: the image series' single-frame files (any order).

    Returns:
        ``(labels, names)``: label map ``(Z, Y, X)`` (uint8, or uint16 beyond 255 ROIs; 0 = background, ROI ``i``
        of ``names`` = label ``i + 1``), ``Z`` in slice order along the normal.

    Raises:
        DicomError: as :func:`rasterise_rtstruct_masks`, and when ROIs overlap (the message names each
            overlapping pair and how many voxels it shares).
    """
    masks, names = rasterise_rtstruct_masks(rtstruct_path, source_files)
    overlapping = masks.sum(axis=0) > 1
    if overlapping.any():
        pairs = []
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                shared = int(np.count_nonzero(masks[i] & masks[j]))
                if shared:
                    pairs.append(f"{names[i]!r} and {names[j]!r} ({shared} voxels)")
        raise DicomError(
            f"{rtstruct_path}: ROIs overlap, so they do not form one label map: " + "; ".join(pairs) + " -- use "
            "one mask per ROI (region-based labels) instead"
        )
    labels = np.zeros(masks.shape[1:], dtype=np.uint8 if len(names) < 256 else np.uint16)
    for i in range(len(names)):
        labels[masks[i]] = i + 1
    return labels, names


def _read_rtstruct(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise DicomError(f"{path}: not a DICOM file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DicomError(f"{path}: cannot read the DICOM file ({exc})") from None
    if str(ds.get("Modality", "")) != "RTSTRUCT" or "StructureSetROISequence" not in ds:
        raise DicomError(f"{path}: not an RTSTRUCT (modality {ds.get('Modality', 'missing')})")
    return ds


def _check_references(ds: Dataset, slices: SourceSlices, path: Path) -> None:
    """Raise when the RTSTRUCT names series other than ``slices``'; warn on another frame of reference."""
    series, frames = set(), set()
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        frames.add(str(frame.get("FrameOfReferenceUID", "")))
        for study in frame.get("RTReferencedStudySequence", []):
            for item in study.get("RTReferencedSeriesSequence", []):
                series.add(str(item.SeriesInstanceUID))
    if series and slices.series_uid not in series:
        raise DicomError(f"{path}: drawn on series {sorted(series)}, not on series {slices.series_uid}")
    if slices.frame_of_reference_uid and frames - {""} and slices.frame_of_reference_uid not in frames:
        logger.warning(
            "%s: frame of reference %s differs from the series' %s; placing the contours by their coordinates",
            path,
            sorted(frames),
            slices.frame_of_reference_uid,
        )


def _slice_of(contour: Dataset, points: np.ndarray, slices: SourceSlices, by_uid: dict[str, int], what: str) -> int:
    """The slice index of a contour: its referenced image when that is in the series, else the plane holding it."""
    for image in contour.get("ContourImageSequence", []):
        k = by_uid.get(str(image.get("ReferencedSOPInstanceUID", "")))
        if k is not None:
            return k
    heights = slices.positions @ slices.normal
    height = float(np.mean(points @ slices.normal))
    k = int(np.argmin(np.abs(heights - height)))
    if len(heights) > 1:
        tolerance = float(np.min(np.diff(heights))) / 2
    else:
        tolerance = float(slices.datasets[0].get("SliceThickness", 1.0) or 1.0) / 2
    if abs(heights[k] - height) > tolerance:
        raise DicomError(
            f"{what}: a contour at {height:.2f} mm along the slice normal lies on no slice of series "
            f"{slices.series_uid} ({heights[0]:.2f} to {heights[-1]:.2f} mm)"
        )
    return k
