"""Helpers for the DICOM output tests: copies of the real series in ``../shared/data/dicom``, and SEG decoders."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk

from tests.conftest import shared_dataset


def dicom_data() -> Path:
    """``../shared/data/dicom`` (read-only; fails when it is missing)."""
    return shared_dataset("dicom")


def copy_series(name: str, dst: Path) -> list[Path]:
    """Copy the ``.dcm`` files of ``../shared/data/dicom/<name>`` (images only) into ``dst``; reversed name order,
    so nothing relies on the order files are listed in."""
    dst.mkdir(parents=True, exist_ok=True)
    files = []
    for src in sorted((dicom_data() / name).glob("*.dcm"), reverse=True):
        if pydicom.dcmread(src, stop_before_pixels=True).Modality == "RTSTRUCT":
            continue
        shutil.copy(src, dst / src.name)
        files.append(dst / src.name)
    return files


def liver_reference() -> tuple[np.ndarray, sitk.Image]:
    """The liver label map of ``ct_3slice`` (``liver_seg_reference.nrrd``): ``(Z, Y, X)`` uint8 and its image."""
    image = sitk.ReadImage(str(dicom_data() / "liver_seg_reference.nrrd"))
    return sitk.GetArrayFromImage(image).astype(np.uint8), image


def rotate_series(files: list[Path], axis: tuple[float, float, float], angle: float) -> None:
    """Rotate a series in patient space in place (orientation and positions about the origin), an oblique copy."""
    k = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx
    for path in files:
        ds = pydicom.dcmread(path)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3)
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (iop @ rotation.T).ravel()]
        ds.ImagePositionPatient = [round(float(v), 5) for v in rotation @ [float(v) for v in ds.ImagePositionPatient]]
        ds.save_as(path)


def crop_series(files: list[Path], rows: slice, columns: slice) -> None:
    """Keep pixels ``[rows, columns]`` of every slice in place, moving ``ImagePositionPatient`` to the new first
    pixel (a small series with real headers)."""
    for path in files:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array[rows, columns].copy()
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        shift = columns.start * column_spacing * iop[:3] + rows.start * row_spacing * iop[3:]
        ds.ImagePositionPatient = [
            round(float(v), 5) for v in np.add([float(v) for v in ds.ImagePositionPatient], shift)
        ]
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.save_as(path)


def decode_with_highdicom(path: Path, sop_uids: list[str], label_of: dict[str, int]) -> np.ndarray:
    """The label map ``(Z, Y, X)`` of a BINARY SEG on the slices ``sop_uids`` (highdicom), segments mapped to
    label ids by their labels (``label_of``: segment label -> label id)."""
    seg = hd.seg.segread(path)
    numbers = seg.get_pixels_by_source_instance(sop_uids, combine_segments=True)
    to_label = np.zeros(len(seg.SegmentSequence) + 1, dtype=np.int64)
    for item in seg.SegmentSequence:
        to_label[item.SegmentNumber] = label_of[item.SegmentLabel]
    return to_label[numbers]


def decode_with_pydicom(path: Path, slices: list[pydicom.Dataset], label_of: dict[str, int]) -> np.ndarray:
    """The label map ``(Z, Y, X)`` of a BINARY SEG on ``slices`` from pydicom alone: the bit-packed frames are
    unpacked here, each frame placed by its referenced source image and checked against its plane position (the
    segment of a frame is in its per-frame functional group, or in the shared one when there is one segment)."""
    ds = pydicom.dcmread(path)
    assert ds.SegmentationType == "BINARY" and ds.BitsAllocated == 1
    n, rows, columns = int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)
    bits = np.unpackbits(np.frombuffer(ds.PixelData, dtype=np.uint8), bitorder="little")
    frames = bits[: n * rows * columns].reshape(n, rows, columns).astype(bool)
    segment_label = {int(s.SegmentNumber): label_of[str(s.SegmentLabel)] for s in ds.SegmentSequence}
    index = {str(s.SOPInstanceUID): k for k, s in enumerate(slices)}
    labels = np.zeros((len(slices), rows, columns), dtype=np.int64)
    shared = ds.SharedFunctionalGroupsSequence[0]
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        identification = group.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        number = int(identification[0].ReferencedSegmentNumber)
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        k = index[uid]
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in slices[k].ImagePositionPatient], atol=1e-4)
        assert not np.any(labels[k][frame]), "segments of a label map do not overlap"
        labels[k][frame] = segment_label[number]
    return labels


def sorted_slices(files: list[Path]) -> list[pydicom.Dataset]:
    """The headers of a series sorted by position along the slice normal (ascending), computed here from the
    headers alone (independently of medseg's sorting)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    iop = np.asarray([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    return sorted(headers, key=lambda h: float(np.dot([float(v) for v in h.ImagePositionPatient], normal)))
