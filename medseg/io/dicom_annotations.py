"""Reading DICOM annotations (SEG, RTSTRUCT) as per-segment masks on their image series' voxel grid.

One reader per kind of object (:data:`ANNOTATION_READERS`, keyed by ``Modality``) turns an annotation and the
:class:`~medseg.io.dicom_series.DicomSeries` it annotates into :class:`SegmentMasks`: one boolean mask per
segment or ROI, ``(Z, Y, X, S)`` with slice ``z`` on ``series.files[z]`` (the volume
:func:`~medseg.io.dicom_series.read_series_image` returns), and the segments' names. How masks become a label
map (overlaps, label ids) is :mod:`medseg.io.dicom_convert`'s business.

DICOM SEG is decoded by highdicom, frame by frame onto the source instances the SEG's frames reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from medseg.errors import MedsegError
from medseg.io.dicom_series import DicomSeries
from medseg.io.rtstruct_reader import rasterise_rtstruct_masks


@dataclass(frozen=True)
class SegmentMasks:
    """The segments of one annotation object on its series' grid.

    Attributes:
        masks: boolean ``(Z, Y, X, S)``, one mask per segment, ``z`` in the series' volume order.
        names: the segments' labels (SEG ``SegmentLabel``, RTSTRUCT ``ROIName``), one per mask, in order.
    """

    masks: np.ndarray
    names: tuple[str, ...]


def read_seg_masks(path: Path, series: DicomSeries) -> SegmentMasks:
    """Decode a DICOM SEG onto ``series`` (highdicom): one mask per segment, empty where no frame refers.

    Fractional SEGs count a voxel as inside where its value (rescaled to [0, 1]) is at least 0.5.

    Raises:
        MedsegError: the file is not a readable SEG, its frames do not lie on the series' grid (another size or
            orientation), or reference no instance of the series (frames that name none are placed by position).
    """
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom/highdicom raise many kinds on a damaged file
        raise MedsegError(f"{path}: not a readable DICOM SEG ({type(exc).__name__}: {str(exc)[:160]})") from None
    if (int(seg.Rows), int(seg.Columns)) != _slice_size(series):
        raise MedsegError(
            f"{path}: SEG frames are {seg.Rows}x{seg.Columns}, the slices of series {series.case_id} "
            f"{'x'.join(map(str, _slice_size(series)))}; medseg converts SEGs drawn on the series' own grid"
        )
    numbers = [int(d.SegmentNumber) for d in seg.SegmentSequence]
    names = tuple(str(d.SegmentLabel) for d in seg.SegmentSequence)
    _check_orientation(path, seg, series)
    if not _names_sources(seg):
        return SegmentMasks(_masks_by_position(path, seg, series, numbers), names)
    try:
        # dcmqi and other writers often omit SpatialLocationsPreserved; the frames are matched to the source
        # instances they name, after the grid (size above, orientation) is checked to be the series'
        pixels = seg.get_pixels_by_source_instance(
            list(series.sop_instance_uids),
            segment_numbers=numbers,
            combine_segments=False,
            assert_missing_frames_are_empty=True,
            ignore_spatial_locations=True,
        )
    except (ValueError, RuntimeError, KeyError, AttributeError) as exc:
        raise MedsegError(
            f"{path}: cannot place the SEG's frames on series {series.case_id} ({str(exc).splitlines()[0][:200]})"
        ) from None
    return SegmentMasks(pixels >= (0.5 if np.issubdtype(pixels.dtype, np.floating) else 1), names)


def _names_sources(seg: hd.seg.Segmentation) -> bool:
    """True when every frame names its source image (``DerivationImageSequence``, per frame or shared)."""
    shared = (seg.get("SharedFunctionalGroupsSequence") or [pydicom.Dataset()])[0]
    return "DerivationImageSequence" in shared or all(
        "DerivationImageSequence" in f for f in seg.get("PerFrameFunctionalGroupsSequence", [])
    )


def _frame_item(seg: hd.seg.Segmentation, k: int, keyword: str) -> pydicom.Dataset | None:
    """Item ``keyword`` of frame ``k``'s functional groups (per-frame, else shared), or None."""
    for groups in (seg.PerFrameFunctionalGroupsSequence[k], (seg.get("SharedFunctionalGroupsSequence") or [{}])[0]):
        if keyword in groups:
            item: pydicom.Dataset = groups[keyword].value[0]
            return item
    return None


def _masks_by_position(path: Path, seg: hd.seg.Segmentation, series: DicomSeries, numbers: list[int]) -> np.ndarray:
    """Masks ``(Z, Y, X, S)`` of a SEG whose frames name no source instance: each frame is placed on the slice of
    ``series`` at its ``ImagePositionPatient`` (within 0.01 mm).

    Raises:
        MedsegError: a frame without a position or segment number, or at a position no slice of the series has.
    """
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    positions = np.asarray([[float(v) for v in h.get("ImagePositionPatient", [np.nan] * 3)] for h in heads])
    frames = np.asarray(seg.pixel_array).reshape(-1, int(seg.Rows), int(seg.Columns))
    inside = frames >= (0.5 * float(seg.get("MaximumFractionalValue", 1)) if "MaximumFractionalValue" in seg else 1)
    masks = np.zeros((len(heads), int(seg.Rows), int(seg.Columns), len(numbers)), dtype=bool)
    for k in range(len(frames)):
        plane, ident = (
            _frame_item(seg, k, "PlanePositionSequence"),
            _frame_item(seg, k, "SegmentIdentificationSequence"),
        )
        if plane is None or ident is None:
            raise MedsegError(f"{path}: frame {k + 1} names neither a source image nor its position and segment")
        where = np.asarray([float(v) for v in plane.ImagePositionPatient])
        z = np.flatnonzero(np.linalg.norm(positions - where, axis=1) < 0.01)
        if len(z) != 1:
            raise MedsegError(
                f"{path}: frame {k + 1} at {where.round(3).tolist()} mm lies on no slice of series {series.case_id}"
            )
        masks[int(z[0]), :, :, numbers.index(int(ident.ReferencedSegmentNumber))] |= inside[k]
    return masks


def _slice_size(series: DicomSeries) -> tuple[int, int]:
    ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    return int(ds.Rows), int(ds.Columns)


def _check_orientation(path: Path, seg: hd.seg.Segmentation, series: DicomSeries) -> None:
    shared = seg.get("SharedFunctionalGroupsSequence")
    plane = shared[0].get("PlaneOrientationSequence") if shared else None
    if not plane:
        return
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True).get("ImageOrientationPatient")
    if source is not None and not np.allclose(
        [float(v) for v in plane[0].ImageOrientationPatient], [float(v) for v in source], atol=1e-4
    ):
        raise MedsegError(f"{path}: the SEG's orientation differs from series {series.case_id}'s")


def read_rtstruct_masks(path: Path, series: DicomSeries) -> SegmentMasks:
    """RTSTRUCT contours rasterised on ``series`` (:func:`~medseg.io.rtstruct_reader.rasterise_rtstruct_masks`):
    one mask per ROI, overlaps kept (the label table refuses them or makes regions).

    Raises:
        DicomError: the RTSTRUCT is unreadable, names no contour on the series' slices, or the series is a
            multi-frame object (contours reference single-frame images).
    """
    masks, names = rasterise_rtstruct_masks(path, list(series.files))
    return SegmentMasks(np.moveaxis(masks, 0, -1), tuple(names))


#: The annotation reader of each ``Modality``: ``reader(annotation_file, series) -> SegmentMasks``.
ANNOTATION_READERS: dict[str, Callable[[Path, DicomSeries], SegmentMasks]] = {
    "SEG": read_seg_masks,
    "RTSTRUCT": read_rtstruct_masks,
}


__all__ = ["ANNOTATION_READERS", "SegmentMasks", "read_rtstruct_masks", "read_seg_masks"]
