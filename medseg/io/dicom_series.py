"""DICOM folders: finding the image series in a folder tree and reading each as one volume.

:func:`scan_dicom_folder` reads the headers of every file under a folder (pydicom, pixel data left unread),
groups image files into series by ``SeriesInstanceUID``, orders each series' slices along the slice normal
(``ImageOrientationPatient`` row x column) and checks them: one orientation, one slice size, no duplicate
positions, even slice spacing (a missing slice shows as a gap), slices stacked along the normal. Objects that
are not images (SEG, RTSTRUCT, SR, RT plans, presentation states, ...) are listed apart, as
:class:`DicomObject`. A bad series or file becomes one message naming it; the others are still returned.

:func:`read_series_image` reads a series' pixel data with SimpleITK's series reader (rescale slope/intercept
applied, e.g. HU for CT) into a ``(Z, Y, X)`` array whose index ``z`` is the file ``series.files[z]``, with the
geometry SimpleITK derives (origin: the first file's ``ImagePositionPatient``; spacing in mm; direction whose
third column is the slice normal). A multi-frame object (one file, ``NumberOfFrames`` > 1) is one series read
whole. :class:`DicomSeries` is what a DICOM writer needs of the source: its files and SOP instance UIDs in
volume order and the study/patient/frame-of-reference identity (:func:`read_series_datasets` gives the full
pydicom datasets in the same order).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from medseg.errors import MedsegError
from medseg.io.image import ImageGeometry

logger = logging.getLogger(__name__)

#: Modalities of DICOM objects that are not images to segment (annotations, documents, plans, states).
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "RTIMAGE", "SR", "PR", "KO", "REG", "RWV", "DOC", "FID"}
)

#: SOP class of a DICOMDIR (the index of a CD or export), listed as a non-image object.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

#: Slices closer than this (mm) along the normal share a position.
POSITION_TOL_MM = 0.01
#: Slice gaps may differ by this much (mm; or 1% of the median gap, whichever is larger) before a series counts as
#: unevenly spaced: positions written with two decimals make gaps differ by up to 0.02 mm.
SPACING_TOL_MM = 0.02


class DicomSeriesError(MedsegError):
    """A DICOM series (or file) cannot be read as a volume; the message names the series and the problem."""


@dataclass(frozen=True)
class DicomSeries:
    """One image series, its files in the slice order of the volume :func:`read_series_image` returns.

    Attributes:
        case_id: a unique, filesystem-safe name (PatientID, SeriesDescription, ``s<SeriesNumber>``).
        series_uid: ``SeriesInstanceUID``.
        files: the series' files; ``files[z]`` holds slice ``z`` of the ``(Z, Y, X)`` volume (one file for a
            multi-frame object).
        sop_instance_uids: ``SOPInstanceUID`` of each file, in the order of ``files``.
        sop_class_uid: ``SOPClassUID`` of the first file.
        modality: ``Modality`` (e.g. ``"CT"``, ``"MR"``).
        patient_id, study_uid, frame_of_reference_uid, description: the first file's ``PatientID``,
            ``StudyInstanceUID``, ``FrameOfReferenceUID``, ``SeriesDescription`` (``""`` when absent).
        number: ``SeriesNumber`` or None.
        number_of_frames: frames of a multi-frame object, else 1 (one frame per file).
    """

    case_id: str
    series_uid: str
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    sop_class_uid: str
    modality: str
    patient_id: str
    study_uid: str
    frame_of_reference_uid: str
    description: str
    number: int | None
    number_of_frames: int = 1


@dataclass(frozen=True)
class DicomObject:
    """A DICOM object that is not an image to segment (SEG, RTSTRUCT, SR, ...).

    Attributes:
        path: its file.
        modality: ``Modality`` (``"SEG"``, ``"RTSTRUCT"``, ...).
        kind: the SOP class's name (e.g. ``"Segmentation Storage"``).
        series_uid: its own ``SeriesInstanceUID``.
        referenced_series_uids: the image series it annotates (SEG: ``ReferencedSeriesSequence``; RTSTRUCT: the
            series of ``ReferencedFrameOfReferenceSequence``); empty when it names none.
        frame_of_reference_uid: ``FrameOfReferenceUID`` (``""`` when absent).
    """

    path: Path
    modality: str
    kind: str
    series_uid: str
    referenced_series_uids: tuple[str, ...]
    frame_of_reference_uid: str


@dataclass
class DicomScan:
    """What :func:`scan_dicom_folder` found.

    Attributes:
        series: the image series that passed the header checks, sorted by case id.
        objects: the non-image objects, sorted by path.
        failed: name (the case id a bad series would have had, or a file path) -> message naming the series
            (case id and UID) or file, one per bad series or file.
        not_dicom: files that are not DICOM (no ``DICM`` preamble), sorted.
        failed_series_uids: the ``SeriesInstanceUID`` of each bad series.
    """

    series: list[DicomSeries] = field(default_factory=list)
    objects: list[DicomObject] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    not_dicom: list[Path] = field(default_factory=list)
    failed_series_uids: set[str] = field(default_factory=set)

    @property
    def found_dicom(self) -> bool:
        """True when any file of the folder is DICOM (readable or not)."""
        return bool(self.series or self.objects or self.failed)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("._-")


def _case_base(ds: pydicom.Dataset) -> str:
    number = _text(ds, "SeriesNumber")
    parts = [_safe(_text(ds, "PatientID")), _safe(_text(ds, "SeriesDescription"))[:40]]
    parts.append(f"s{_safe(number)}" if number else "")
    return "_".join(p for p in parts if p)[:100] or "series"


def _files_under(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
    return found


def _referenced_series(ds: pydicom.Dataset) -> tuple[str, ...]:
    uids = [str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in s]
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            uids += [str(s.SeriesInstanceUID) for s in study.get("RTReferencedSeriesSequence", [])]
    return tuple(dict.fromkeys(uids))


def _is_image(ds: pydicom.Dataset) -> bool:
    return _text(ds, "Modality").upper() not in NON_IMAGE_MODALITIES and "Rows" in ds and "Columns" in ds


def _vec(ds: pydicom.Dataset, keyword: str, n: int) -> np.ndarray | None:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        return None
    return arr if arr is not None and arr.shape == (n,) else None


def _order_slices(label: str, items: list[tuple[Path, pydicom.Dataset]]) -> list[tuple[Path, pydicom.Dataset]]:
    """``items`` sorted along the slice normal, after checking they form one evenly spaced stack.

    Raises:
        DicomSeriesError: naming ``label`` and the problem.
    """
    if len({(int(ds.Rows), int(ds.Columns)) for _, ds in items}) > 1:
        raise DicomSeriesError(f"{label}: slices of different sizes (Rows x Columns) in one series")
    if len(items) == 1:
        return items
    orient, pos = [], []
    for path, ds in items:
        o, p = _vec(ds, "ImageOrientationPatient", 6), _vec(ds, "ImagePositionPatient", 3)
        if o is None or p is None:
            raise DicomSeriesError(f"{label}: {path.name} has no valid ImageOrientationPatient/ImagePositionPatient")
        orient.append(o)
        pos.append(p)
    if any(not np.allclose(o, orient[0], atol=1e-4) for o in orient):
        n = len({tuple(np.round(o, 4)) for o in orient})
        raise DicomSeriesError(f"{label}: mixed orientations ({n} different ImageOrientationPatient values)")
    normal = np.cross(orient[0][:3], orient[0][3:])
    depth = np.asarray([float(p @ normal) for p in pos])
    order = np.argsort(depth, kind="stable")
    depth, points = depth[order], np.asarray(pos)[order]
    gaps = np.diff(depth)
    if (gaps < POSITION_TOL_MM).any():
        n = int((gaps < POSITION_TOL_MM).sum())
        raise DicomSeriesError(
            f"{label}: {n} slice(s) share a position with another (duplicate slices, or several echoes/time "
            "points in one series); split the series"
        )
    median = float(np.median(gaps))
    if gaps.max() - gaps.min() > max(SPACING_TOL_MM, 0.01 * median):
        k = int(np.argmax(gaps))
        raise DicomSeriesError(
            f"{label}: unevenly spaced slices (gaps {gaps.min():.3f} to {gaps.max():.3f} mm, the largest after "
            f"slice {k + 1} of {len(items)}); a slice is missing or the series mixes stacks"
        )
    drift = points - points[0] - np.outer(depth - depth[0], normal)
    if np.linalg.norm(drift, axis=1).max() > max(SPACING_TOL_MM, 0.01 * median):
        raise DicomSeriesError(
            f"{label}: slices are not stacked along the slice normal (gantry tilt or a sheared stack); "
            "resample the series to an orthogonal grid first"
        )
    return [items[int(i)] for i in order]


def _build_series(uid: str, items: list[tuple[Path, pydicom.Dataset]]) -> tuple[str, DicomSeries]:
    first = items[0][1]
    label = f"series {_case_base(first)} ({uid})"
    frames = [int(ds.get("NumberOfFrames", 1) or 1) for _, ds in items]
    if max(frames) > 1 and len(items) > 1:
        raise DicomSeriesError(
            f"{label}: {len(items)} files of which some are multi-frame; expected one multi-frame file"
        )
    ordered = _order_slices(label, items)
    series = DicomSeries(
        case_id="",
        series_uid=uid,
        files=tuple(p for p, _ in ordered),
        sop_instance_uids=tuple(_text(ds, "SOPInstanceUID") for _, ds in ordered),
        sop_class_uid=_text(first, "SOPClassUID"),
        modality=_text(first, "Modality"),
        patient_id=_text(first, "PatientID"),
        study_uid=_text(first, "StudyInstanceUID"),
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID"),
        description=_text(first, "SeriesDescription"),
        number=int(first.SeriesNumber) if _text(first, "SeriesNumber").lstrip("-").isdigit() else None,
        number_of_frames=frames[0],
    )
    return _case_base(first), series


def scan_dicom_folder(folder: str | Path) -> DicomScan:
    """Find the DICOM image series and other DICOM objects under ``folder`` (recursively; headers only).

    Hidden files and folders are left out. Case ids are made unique by ``_2``, ``_3``, ... in series UID order.

    Args:
        folder: a folder of DICOM files, in any sub-folder structure.

    Returns:
        The :class:`DicomScan`: good series (files in volume order), non-image objects, one message per bad
        series or unreadable file, and the files that are not DICOM.
    """
    scan = DicomScan()
    by_series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in _files_under(Path(folder)):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = _text(ds, "SeriesInstanceUID")
        except InvalidDicomError:
            scan.not_dicom.append(path)
            continue
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a damaged file
            scan.failed[str(path)] = f"{path}: corrupt DICOM file ({type(exc).__name__}: {str(exc)[:160]})"
            continue
        sop = ds.get("SOPClassUID") or getattr(ds, "file_meta", pydicom.Dataset()).get("MediaStorageSOPClassUID")
        if not uid and sop != MEDIA_STORAGE_DIRECTORY:
            scan.failed[str(path)] = f"{path}: DICOM file without a SeriesInstanceUID (truncated or incomplete header)"
        elif uid and _is_image(ds):
            by_series.setdefault(uid, []).append((path, ds))
        else:
            kind = getattr(sop, "name", str(sop)) if sop is not None else "unknown SOP class"
            refs = _referenced_series(ds)
            scan.objects.append(
                DicomObject(path, _text(ds, "Modality"), kind, uid, refs, _text(ds, "FrameOfReferenceUID"))
            )
    named: list[tuple[str, DicomSeries]] = []
    for uid in sorted(by_series):
        try:
            named.append(_build_series(uid, by_series[uid]))
        except DicomSeriesError as exc:
            base = _case_base(by_series[uid][0][1])
            scan.failed[base if base not in scan.failed else f"{base} ({uid})"] = str(exc)
            scan.failed_series_uids.add(uid)
    used: dict[str, int] = {}
    for base, series in named:
        used[base] = used.get(base, 0) + 1
        case_id = base if used[base] == 1 else f"{base}_{used[base]}"
        scan.series.append(replace(series, case_id=case_id))
    scan.series.sort(key=lambda s: s.case_id)
    scan.objects.sort(key=lambda o: o.path)
    return scan


def read_series_image(series: DicomSeries) -> tuple[np.ndarray, ImageGeometry]:
    """Read a series' pixel data as one volume with SimpleITK (rescale slope/intercept applied).

    Returns:
        ``(array, geometry)``: array ``(Z, Y, X)`` (slice ``z`` from ``series.files[z]``; a multi-frame object's
        frames in the file's order), geometry with origin and direction in SimpleITK (x, y, z) order, spacing mm.

    Raises:
        DicomSeriesError: a file's pixel data is unreadable (truncated, unsupported transfer syntax), the image
            has several components per voxel (colour), or SimpleITK's geometry disagrees with the headers.
    """
    label = f"series {series.case_id} ({series.series_uid})"
    try:
        if len(series.files) == 1:  # the series reader would give a multi-frame object a fourth axis
            image = sitk.ReadImage(str(series.files[0]))
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(f) for f in series.files])
            image = reader.Execute()
    except RuntimeError as exc:
        bad = next((p for p in (_pixel_problem(f) for f in series.files) if p), None)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = bad or next((ln for ln in lines if "ERROR" in ln or "xception" in ln), lines[-1] if lines else "")
        raise DicomSeriesError(f"{label}: cannot read the pixel data ({detail[:200]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DicomSeriesError(
            f"{label}: {image.GetNumberOfComponentsPerPixel()} components per voxel (colour); medseg reads "
            "single-component (greyscale) series"
        )
    geometry = ImageGeometry.from_sitk(image)
    expected = series.number_of_frames if len(series.files) == 1 else len(series.files)
    if geometry.ndim == 3 and geometry.shape[0] != expected:
        raise DicomSeriesError(f"{label}: read {geometry.shape[0]} slice(s), expected {expected}")
    if len(series.files) > 1:
        first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        position = _vec(first, "ImagePositionPatient", 3)
        if position is None or not np.allclose(position, geometry.origin, atol=POSITION_TOL_MM):
            raise DicomSeriesError(f"{label}: SimpleITK's origin {geometry.origin} is not the first slice's position")
    return sitk.GetArrayFromImage(image), geometry


def _pixel_problem(path: Path) -> str | None:
    """What is wrong with a file's pixel data (unreadable, truncated), or None when nothing is found."""
    try:
        ds = pydicom.dcmread(path)
        data = ds.PixelData
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a damaged file
        return f"{path.name}: {type(exc).__name__}: {str(exc)[:120]}"
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames * int(ds.BitsAllocated) // 8
    if len(data) < expected:
        return f"{path.name}: truncated pixel data ({len(data)} of {expected} bytes)"
    return None


def read_series_datasets(series: DicomSeries, pixels: bool = True) -> list[pydicom.Dataset]:
    """The pydicom datasets of ``series.files``, in volume order (e.g. the source images of a DICOM SEG).

    Args:
        series: the series.
        pixels: also read the pixel data (False: headers only).
    """
    return [pydicom.dcmread(f, stop_before_pixels=not pixels) for f in series.files]


__all__ = [
    "NON_IMAGE_MODALITIES",
    "DicomObject",
    "DicomScan",
    "DicomSeries",
    "DicomSeriesError",
    "read_series_datasets",
    "read_series_image",
    "scan_dicom_folder",
]
