"""Rasterise a DICOM RT Structure Set (RTSTRUCT) onto the grid of its image series (pydicom + skimage).

Each ``CLOSED_PLANAR`` contour is placed on a slice -- the one its ``ContourImageSequence`` references when that
slice is in the series, else the slice whose plane holds it (within half the smallest slice gap, or half the
slice thickness for a single slice) -- converted to fractional pixel indices with the slice's position,
orientation and pixel spacing, and filled by :func:`fill_polygon` (pixels whose centre lies inside; the same
pixels as :func:`skimage.draw.polygon`, whose point-in-polygon test of every pixel of the bounding box against
every edge takes seconds per slice for an organ's contour of a few thousand points, where a scan-line fill takes
milliseconds).
The contours of one ROI on one slice combine by the even-odd rule, so a contour inside another is a hole;
pixels whose centre lies on a contour (within 1e-3 pixel) belong to the ROI too, as in tools that draw contours
through the centres of the boundary pixels (rt-utils, OpenCV), whose masks then come back exactly. medseg's own
contours pass at least 0.35 pixel from every centre, so for them this changes nothing.
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

from medseg.errors import DicomError
from medseg.io.dicom_slices import SourceSlices, read_source_slices

__all__ = ["fill_polygon", "rasterise_rtstruct", "rasterise_rtstruct_masks"]

logger = logging.getLogger(__name__)

#: Largest distance (pixels) of a pixel centre from a contour that still counts as on it.
ON_EDGE = 1e-3


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
    edges: list[list[tuple[int, np.ndarray, np.ndarray]]] = [[] for _ in rois]
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
            masks[index, k] ^= fill_polygon(rows, columns, slices.rows, slices.columns)
            edges[index].append((k, *_on_edges(rows, columns, slices.rows, slices.columns)))
        if skipped:
            logger.warning("%s: ROI %r: %s contour(s) enclose nothing, skipped", path, names[index], sorted(skipped))
    for index, found in enumerate(edges):
        for k, rr, cc in found:
            masks[index, k, rr, cc] = True
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


def fill_polygon(rows: np.ndarray, columns: np.ndarray, height: int, width: int) -> np.ndarray:
    """The pixels of a ``height`` x ``width`` slice whose centres lie inside a closed polygon (even-odd rule).

    Args:
        rows, columns: the polygon's vertices as fractional pixel indices (row = ``Y``, column = ``X``); the last
            vertex connects to the first.
        height, width: the slice's size in pixels.

    Returns:
        Boolean mask ``(Y, X)``. A centre exactly on an edge may fall either way (see :func:`_on_edges`).
    """
    r0 = np.asarray(rows, dtype=np.float64)
    c0 = np.asarray(columns, dtype=np.float64)
    r1, c1 = np.roll(r0, -1), np.roll(c0, -1)
    # each edge crosses the rows y with min(r0, r1) <= y < max(r0, r1) (half-open: a vertex is counted once)
    low, high = np.minimum(r0, r1), np.maximum(r0, r1)
    first = np.maximum(np.ceil(low), 0)
    last = np.minimum(np.ceil(high) - 1, height - 1)
    counts = np.maximum(last - first + 1, 0).astype(np.int64)
    edge = np.repeat(np.arange(len(r0)), counts)
    y = first[edge] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    x = c0[edge] + (y - r0[edge]) * (c1[edge] - c0[edge]) / (r1[edge] - r0[edge])
    mask = np.zeros((height, width), dtype=bool)
    if not y.size:
        return mask
    # a crossing at x toggles every pixel centre to its right: parity of the crossings left of each centre,
    # counted within the polygon's bounding box only
    top, bottom = int(y.min()), int(y.max()) + 1
    left = int(np.clip(np.floor(x.min()) + 1, 0, width))
    right = int(np.clip(np.floor(x.max()) + 1, 0, width))
    toggles = np.zeros((bottom - top, right - left + 1), dtype=np.int64)
    columns_at = np.clip(np.floor(x) + 1, left, right).astype(np.int64) - left
    np.add.at(toggles, (y.astype(np.int64) - top, columns_at), 1)
    mask[top:bottom, left:right] = np.cumsum(toggles[:, : right - left], axis=1) % 2 == 1
    return mask


def _on_edges(rows: np.ndarray, columns: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixels ``(rr, cc)`` of a ``height`` x ``width`` slice whose centres lie on the closed polygon
    ``(rows, columns)`` (fractional pixel indices), within :data:`ON_EDGE` pixel.

    Each edge is walked along its longer axis, one integer step at a time (all edges at once); a centre is on it
    where the other coordinate is within :data:`ON_EDGE` of an integer.
    """
    start = np.stack([np.asarray(rows, np.float64), np.asarray(columns, np.float64)], axis=1)  # (N, 2)
    end = np.roll(start, -1, axis=0)
    axis = (np.abs(end[:, 1] - start[:, 1]) > np.abs(end[:, 0] - start[:, 0])).astype(np.int64)  # 0: rows major
    n = np.arange(len(start))
    a, b = start[n, axis], end[n, axis]
    a_minor, b_minor = start[n, 1 - axis], end[n, 1 - axis]
    first = np.ceil(np.minimum(a, b) - ON_EDGE)
    counts = np.maximum(np.floor(np.maximum(a, b) + ON_EDGE) - first + 1, 0).astype(np.int64)
    which = np.repeat(n, counts)
    major = first[which] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    span = b - a
    slope = np.divide(b_minor - a_minor, span, out=np.zeros_like(span), where=span != 0)
    minor = a_minor[which] + (major - a[which]) * slope[which]
    keep = np.abs(minor - np.round(minor)) <= ON_EDGE
    major, minor, rows_major = major[keep], np.round(minor[keep]), axis[which][keep] == 0
    rr = np.where(rows_major, major, minor).astype(np.int64)
    cc = np.where(rows_major, minor, major).astype(np.int64)
    inside = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
    return rr[inside], cc[inside]
