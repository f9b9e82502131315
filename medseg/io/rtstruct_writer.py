"""Write a label map as a DICOM RT Structure Set (RTSTRUCT) of the image series it was predicted on (pydicom).

:func:`write_rtstruct` writes one ROI per label present in the map (ROI numbers ``1..n`` in increasing label-id
order, ROI names from ``dataset.json``, colours and SNOMED CT identification codes of
:mod:`medseg.io.dicom_segments`, generation algorithm AUTOMATIC with the algorithm's name, version and model in
``ROIGenerationDescription``). Each ROI has, per slice, one ``CLOSED_PLANAR`` contour per boundary of the label's
pixels: :func:`skimage.measure.find_contours` at level 0.5 on the slice's mask (padded by one background pixel so
every contour closes), i.e. the polygon through the midpoints between foreground and background pixel centres,
converted to patient coordinates (mm) with the slice's ``ImagePositionPatient``, ``ImageOrientationPatient`` and
``PixelSpacing``. Holes are contours of their own, so a reader fills the contours of a slice with the even-odd
rule (as :func:`medseg.io.rtstruct_reader.rasterise_rtstruct` does). Every contour references its slice
(``ContourImageSequence``) and the structure set references every slice of the series.

Contours are polygons, so a round trip (write, rasterise) can lose pixels where a boundary passes exactly through
a pixel centre; objects connected only diagonally become separate contours (4-connected foreground).

Slice order: ``labels[k]`` belongs to the ``k``-th source slice sorted along the slice normal
(:func:`medseg.io.dicom_slices.read_source_slices`). An empty label map: nothing written, None returned.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from skimage.measure import find_contours

import medseg
from medseg.io.dicom_segments import describe_label
from medseg.io.dicom_slices import SourceSlices, read_source_slices
from medseg.io.image import atomic_write_stream

__all__ = ["RtstructWritten", "write_rtstruct"]

logger = logging.getLogger(__name__)

#: Detached Study Management SOP Class (retired), the customary ``ReferencedSOPClassUID`` of an RT referenced study.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
#: Decimal places of the contour coordinates (mm): 0.1 micrometre, far below any pixel.
DECIMALS = 4
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


@dataclass(frozen=True)
class RtstructWritten:
    """What :func:`write_rtstruct` wrote.

    Attributes:
        path: the RTSTRUCT file.
        rois: label id -> ROI number.
        contours: number of contours written.
    """

    path: Path
    rois: dict[int, int]
    contours: int


def write_rtstruct(
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
) -> RtstructWritten | None:
    """Write ``labels`` as an RTSTRUCT of the series ``source_files`` (arguments as
    :func:`medseg.io.dicom_seg_writer.write_dicom_seg`).

    Args:
        labels: label map ``(Z, Y, X)`` of label ids (0 = background) on the source grid, ``Z`` in slice order.
        source_files: the source series' single-frame image files (any order), or the series already read.
        label_names: label id -> ROI name; a present id without a name is called ``label <id>``.
        out_path: the RTSTRUCT file to write (atomically).
        algorithm_name, algorithm_version, model_id: recorded in each ROI's ``ROIGenerationDescription``, the
            equipment module and the structure set's description.
        series_description: the RTSTRUCT series' description (default ``"<algorithm_name> structures"``).
        series_number: the series' number (default: the source series' number + 2000).

    Returns:
        What was written, or None for an empty label map (nothing written).

    Raises:
        medseg.errors.DicomError: the source files are not one single-frame series or the label map is not on
            their grid.
    """
    slices = source_files if isinstance(source_files, SourceSlices) else read_source_slices(source_files)
    labels = np.asarray(labels)
    slices.check_labels(labels, str(out_path))
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not present:
        logger.info("%s: no foreground in the label map; no ROI to write, no RTSTRUCT written", out_path)
        return None
    rois = {label: number for number, label in enumerate(present, start=1)}
    source = slices.datasets[0]
    now = datetime.datetime.now()
    ds = _new_dataset(source, now)
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number or (int(source.get("SeriesNumber", 0) or 0) + 2000)
    ds.SeriesDescription = (series_description or f"{algorithm_name} structures")[:64]
    ds.Manufacturer = algorithm_name[:64]
    ds.ManufacturerModelName = model_id[:64]
    ds.SoftwareVersions = algorithm_version[:64]
    ds.StructureSetLabel = algorithm_name[:16]
    ds.StructureSetName = algorithm_name[:64]
    ds.StructureSetDescription = f"{algorithm_name} {algorithm_version}: {model_id}"[:1024]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(slices)])
    generation = f"{algorithm_name} {algorithm_version} model {model_id}"[:64]
    roi_items, contour_items, observations = [], [], []
    total = 0
    for label, number in rois.items():
        described = describe_label(label, label_names.get(label, f"label {label}"))
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = slices.frame_of_reference_uid
        roi.ROIName = described.name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = generation
        roi_items.append(roi)
        item = Dataset()
        item.ROIDisplayColor = list(described.rgb)
        item.ReferencedROINumber = number
        contours = _contours(labels == label, slices)
        total += len(contours)
        item.ContourSequence = DicomSequence(contours)
        contour_items.append(item)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN" if described.known else ""
        observation.ROIInterpreter = ""
        if described.known:
            code = Dataset()
            code.CodeValue = described.type.value
            code.CodingSchemeDesignator = described.type.scheme_designator
            code.CodeMeaning = described.type.meaning
            observation.RTROIIdentificationCodeSequence = DicomSequence([code])
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    out_path = Path(out_path)
    atomic_write_stream(out_path, lambda fh: pydicom.dcmwrite(fh, ds, enforce_file_format=True), ".dcm")
    logger.info("%s: RTSTRUCT with %d ROI(s), %d contour(s)", out_path.name, len(rois), total)
    return RtstructWritten(out_path, rois, total)


def _new_dataset(source: Dataset, now: datetime.datetime) -> Dataset:
    """An RTSTRUCT dataset with file meta, SOP common, patient and study modules (copied from ``source``)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet") or "ISO_IR 192"
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    for keyword in PATIENT_AND_STUDY:
        setattr(ds, keyword, source.get(keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    return ds


def _referenced_frame(slices: SourceSlices) -> Dataset:
    """The ``ReferencedFrameOfReferenceSequence`` item: frame of reference, study, series and every slice."""
    images = []
    for image in slices.datasets:
        ref = Dataset()
        ref.ReferencedSOPClassUID = image.SOPClassUID
        ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
        images.append(ref)
    series = Dataset()
    series.SeriesInstanceUID = slices.series_uid
    series.ContourImageSequence = DicomSequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = slices.datasets[0].StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = slices.frame_of_reference_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _contours(mask: np.ndarray, slices: SourceSlices) -> list[Dataset]:
    """``ContourSequence`` items of a ``(Z, Y, X)`` boolean mask, slice by slice (see the module docstring)."""
    items = []
    for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        padded = np.pad(mask[k], 1).astype(np.uint8)
        for line in find_contours(padded, 0.5, fully_connected="low"):  # type: ignore[no-untyped-call]  # skimage
            points = line[:-1] if np.array_equal(line[0], line[-1]) else line  # closed: drop the repeated point
            if len(points) < 3:
                continue
            xyz = slices.to_patient(int(k), points[:, 0] - 1, points[:, 1] - 1)
            item = Dataset()
            image = Dataset()
            image.ReferencedSOPClassUID = slices.datasets[k].SOPClassUID
            image.ReferencedSOPInstanceUID = slices.datasets[k].SOPInstanceUID
            item.ContourImageSequence = DicomSequence([image])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourData = [round(float(v), DECIMALS) for v in xyz.reshape(-1)]
            items.append(item)
    return items
