"""The slices of a single-frame DICOM image series in the order medseg's label maps use, with their geometry.

The DICOM writers (:mod:`medseg.io.dicom_seg_writer`, :mod:`medseg.io.rtstruct_writer`) and the RTSTRUCT reader
(:mod:`medseg.io.rtstruct_reader`) map slice ``k`` of a ``(Z, Y, X)`` label map to a source image through
:func:`read_source_slices`: the files are sorted by ``ImagePositionPatient`` projected on the slice normal
(``row cosine x column cosine`` of ``ImageOrientationPatient``), ascending -- the order in which SimpleITK's
``ImageSeriesReader`` with ``GetGDCMSeriesFileNames`` stacks a series, so a volume read that way has its label map
in this order whatever order the files are given in. Within a slice, ``Y`` is the row index and ``X`` the column
index of the DICOM pixel data.

Patient coordinates (mm, DICOM LPS) of pixel ``(row r, column c)`` of slice ``k``::

    position[k] + c * column_spacing * row_cosine + r * row_spacing * column_cosine

:func:`slice_order_of` checks that a label map's :class:`~medseg.io.image.ImageGeometry` lies on these slices
(and reverses ``Z`` when the image was stacked the other way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medseg.errors import DicomError
from medseg.io.image import ImageGeometry

__all__ = ["SourceSlices", "read_source_slices", "slice_order_of"]

#: Largest distance (mm) between positions or orientation components that still count as the same.
POSITION_TOLERANCE_MM = 1e-2
ORIENTATION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class SourceSlices:
    """A single-frame image series sorted along its slice normal (ascending).

    Attributes:
        paths: the files, in slice order.
        datasets: their headers (read without pixel data), in slice order.
        positions: ``ImagePositionPatient`` of each slice, ``(Z, 3)`` mm.
        row_cosine: direction of increasing column index ``X`` (``ImageOrientationPatient[:3]``).
        column_cosine: direction of increasing row index ``Y`` (``ImageOrientationPatient[3:]``).
        normal: ``row_cosine x column_cosine``, the direction of increasing ``Z``.
        row_spacing: mm between rows (``PixelSpacing[0]``, along ``Y``).
        column_spacing: mm between columns (``PixelSpacing[1]``, along ``X``).
        rows: pixels per column (``Y`` size); columns: pixels per row (``X`` size).
    """

    paths: tuple[Path, ...]
    datasets: tuple[Dataset, ...]
    positions: np.ndarray
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    normal: np.ndarray
    row_spacing: float
    column_spacing: float
    rows: int
    columns: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """The ``(Z, Y, X)`` shape of a label map on this series."""
        return len(self.paths), self.rows, self.columns

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].get("FrameOfReferenceUID", ""))

    @property
    def sop_instance_uids(self) -> list[str]:
        """``SOPInstanceUID`` of each slice, in slice order."""
        return [str(d.SOPInstanceUID) for d in self.datasets]

    def to_patient(self, k: int, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Patient coordinates ``(N, 3)`` mm of (fractional) pixel indices ``rows``, ``columns`` of slice ``k``."""
        r = np.asarray(rows, dtype=np.float64)[:, None]
        c = np.asarray(columns, dtype=np.float64)[:, None]
        return np.asarray(
            self.positions[k] + c * self.column_spacing * self.row_cosine + r * self.row_spacing * self.column_cosine
        )

    def to_pixel(self, k: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional ``(rows, columns)`` in slice ``k`` of patient points ``(N, 3)`` mm (projected on its plane)."""
        offset = np.asarray(points, dtype=np.float64) - self.positions[k]
        return offset @ self.column_cosine / self.row_spacing, offset @ self.row_cosine / self.column_spacing

    def check_labels(self, labels: np.ndarray, what: str) -> None:
        """Raise :class:`DicomError` unless ``labels`` is a ``(Z, Y, X)`` integer map on this series' grid."""
        if labels.ndim != 3 or tuple(labels.shape) != self.shape:
            raise DicomError(
                f"{what}: the label map has shape {tuple(labels.shape)} but series {self.series_uid} is "
                f"{self.shape} (Z, Y, X)"
            )
        if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(labels.dtype, np.bool_):
            raise DicomError(f"{what}: the label map must hold integer label ids, got {labels.dtype}")


def read_source_slices(source_files: Sequence[Path | str]) -> SourceSlices:
    """Read the headers of a single-frame image series and sort its slices along the normal.

    Args:
        source_files: the series' files, in any order.

    Returns:
        The :class:`SourceSlices`, ascending along the slice normal.

    Raises:
        DicomError: no files, an unreadable or non-DICOM file, a multi-frame or non-image object, slices of more
            than one series, orientation, pixel spacing or size, or two slices at one position.
    """
    paths = [Path(p) for p in source_files]
    if not paths:
        raise DicomError("no source DICOM files were given")
    datasets = [_read_header(p) for p in paths]
    first = datasets[0]
    row, column = _orientation(first, paths[0])
    normal = np.cross(row, column)
    problems = []
    for path, ds in zip(paths, datasets):
        if str(ds.SeriesInstanceUID) != str(first.SeriesInstanceUID):
            problems.append(f"{path.name} is of series {ds.SeriesInstanceUID}, not {first.SeriesInstanceUID}")
        r, c = _orientation(ds, path)
        if not (np.allclose(r, row, atol=ORIENTATION_TOLERANCE) and np.allclose(c, column, atol=ORIENTATION_TOLERANCE)):
            problems.append(f"{path.name} has another ImageOrientationPatient than {paths[0].name}")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            problems.append(
                f"{path.name} is {ds.Rows}x{ds.Columns} pixels, {paths[0].name} {first.Rows}x{first.Columns}"
            )
        if not np.allclose(_floats(ds, "PixelSpacing", path, 2), _floats(first, "PixelSpacing", paths[0], 2)):
            problems.append(f"{path.name} has another PixelSpacing than {paths[0].name}")
    if problems:
        raise DicomError(f"{paths[0].parent}: the source slices do not form one series: " + "; ".join(problems))
    positions = np.array([_floats(ds, "ImagePositionPatient", p, 3) for p, ds in zip(paths, datasets)])
    order = np.argsort(positions @ normal, kind="stable")
    distances = (positions @ normal)[order]
    gaps = np.diff(distances)
    if gaps.size and gaps.min() < POSITION_TOLERANCE_MM:
        k = int(np.argmin(gaps))
        raise DicomError(
            f"{paths[order[k]]} and {paths[order[k + 1]].name}: two slices at the same position "
            f"({distances[k]:.3f} mm along the normal)"
        )
    spacing = _floats(first, "PixelSpacing", paths[0], 2)
    return SourceSlices(
        paths=tuple(paths[i] for i in order),
        datasets=tuple(datasets[i] for i in order),
        positions=positions[order],
        row_cosine=row,
        column_cosine=column,
        normal=normal,
        row_spacing=float(spacing[0]),
        column_spacing=float(spacing[1]),
        rows=int(first.Rows),
        columns=int(first.Columns),
    )


def slice_order_of(geometry: ImageGeometry, slices: SourceSlices, what: str) -> int:
    """``+1`` when a label map's ``Z`` runs along the sorted slices, ``-1`` when it runs backwards.

    Args:
        geometry: the label map's geometry (SimpleITK order: origin and direction ``(x, y, z)``).
        slices: the source series.
        what: the case, for messages.

    Raises:
        DicomError: the geometry's shape, origin or direction does not match the series.
    """
    if tuple(geometry.shape) != slices.shape:
        raise DicomError(f"{what}: the image is {tuple(geometry.shape)} (Z, Y, X) but its series is {slices.shape}")
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    origin = np.asarray(geometry.origin, dtype=np.float64)
    in_plane = np.allclose(direction[:, 0], slices.row_cosine, atol=1e-3) and np.allclose(
        direction[:, 1], slices.column_cosine, atol=1e-3
    )
    tolerance = max(POSITION_TOLERANCE_MM, 1e-3 * max(slices.row_spacing, slices.column_spacing))
    if in_plane and np.linalg.norm(origin - slices.positions[0]) <= tolerance:
        return 1
    if in_plane and np.linalg.norm(origin - slices.positions[-1]) <= tolerance:
        return -1
    raise DicomError(
        f"{what}: the image's origin {tuple(round(v, 3) for v in origin)} and direction do not match the first or "
        f"last slice of series {slices.series_uid}; it was not read from these files"
    )


def _read_header(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise DicomError(f"{path}: not a DICOM file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DicomError(f"{path}: cannot read the DICOM file ({exc})") from None
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Rows", "Columns") if k not in ds]
    if missing:
        raise DicomError(f"{path}: not a DICOM image (no {', '.join(missing)})")
    if "Image" not in ds.SOPClassUID.name:
        raise DicomError(f"{path}: not a DICOM image ({ds.SOPClassUID.name})")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomError(f"{path}: a multi-frame image; DICOM output supports series of single-frame images only")
    return ds


def _floats(ds: Dataset, keyword: str, path: Path, count: int) -> np.ndarray:
    value = ds.get(keyword)
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.size != count or not np.all(np.isfinite(values)):
        raise DicomError(f"{path}: no valid {keyword} ({count} numbers expected, got {value!r})")
    return values


def _orientation(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray]:
    iop = _floats(ds, "ImageOrientationPatient", path, 6)
    row, column = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3 or abs(row @ column) > 1e-3:
        raise DicomError(f"{path}: ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors")
    return row / np.linalg.norm(row), column / np.linalg.norm(column)
