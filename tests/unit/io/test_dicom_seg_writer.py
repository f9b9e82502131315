"""DICOM SEG output (:func:`medseg.io.dicom_seg_writer.write_dicom_seg`) on the real 3-slice CT of
``../shared/data/dicom``: the SEG decodes, with highdicom and with pydicom alone, to exactly the label map written."""

from __future__ import annotations

import shutil

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import medseg
from medseg.errors import DicomError
from medseg.io.dicom_seg_writer import write_dicom_seg
from medseg.io.dicom_slices import read_source_slices, slice_order_of
from medseg.io.image import ImageGeometry
from tests.unit.io._dicom import (
    copy_series,
    decode_with_highdicom,
    decode_with_pydicom,
    dicom_data,
    liver_reference,
    rotate_series,
    sorted_slices,
)

NAMES = {1: "Liver", 3: "lesion_left"}


def _labels_with_lesion() -> np.ndarray:
    """The real liver mask (label 1) plus a synthetic label 3 on slices 1-2, partly inside the liver."""
    labels, _ = liver_reference()
    labels = labels.copy()
    labels[1:, 200:260, 150:190] = 3
    labels[2, 300, 300] = 3  # a single voxel
    return labels


def test_reference_label_map_lies_on_the_sorted_series(tmp_path):
    files = copy_series("ct_3slice", tmp_path / "ct")
    labels, image = liver_reference()
    slices = read_source_slices(files)
    assert slice_order_of(ImageGeometry.from_sitk(image), slices, "ref") == 1
    assert [s.SOPInstanceUID for s in slices.datasets] == [s.SOPInstanceUID for s in sorted_slices(files)]
    reader = sitk.ImageSeriesReader()  # SimpleITK stacks the series in the same order
    names = reader.GetGDCMSeriesFileNames(str(tmp_path / "ct"))
    assert [str(p) for p in slices.paths] == list(names)
    assert labels.shape == slices.shape


def test_seg_decodes_to_the_label_map(tmp_path):
    files = copy_series("ct_3slice", tmp_path / "ct")
    labels = _labels_with_lesion()
    written = write_dicom_seg(labels, files, NAMES, tmp_path / "out" / "case_seg.dcm", model_id="Dataset9 unet")
    assert written is not None and written.segments == {1: 1, 3: 2}
    slices = sorted_slices(files)
    label_of = {name: label for label, name in NAMES.items()}
    by_highdicom = decode_with_highdicom(written.path, [str(s.SOPInstanceUID) for s in slices], label_of)
    by_pydicom = decode_with_pydicom(written.path, slices, label_of)
    np.testing.assert_array_equal(by_highdicom, labels)
    np.testing.assert_array_equal(by_pydicom, labels)
    present = sum(int(np.any(labels[k] == v)) for k in range(labels.shape[0]) for v in NAMES)
    assert written.frames == present == int(pydicom.dcmread(written.path).NumberOfFrames)
    assert not list((tmp_path / "out").glob(".tmp_*"))


def test_seg_on_an_oblique_series(tmp_path):
    files = copy_series("ct_3slice", tmp_path / "ct")
    rotate_series(files, (0.3, -0.5, 0.8), 0.7)
    labels = _labels_with_lesion()
    order = sorted_slices(files)
    written = write_dicom_seg(labels, files, NAMES, tmp_path / "seg.dcm", model_id="m")
    label_of = {name: label for label, name in NAMES.items()}
    np.testing.assert_array_equal(decode_with_pydicom(written.path, order, label_of), labels)
    seg = hd.seg.segread(written.path)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orientation], [float(v) for v in order[0].ImageOrientationPatient])


def test_seg_describes_its_segments_and_references_the_series(tmp_path):
    files = copy_series("ct_3slice", tmp_path / "ct")
    written = write_dicom_seg(_labels_with_lesion(), files, NAMES, tmp_path / "seg.dcm", model_id="Dataset9 2 x unet")
    seg = hd.seg.segread(written.path)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == source.PatientID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    liver, lesion = seg.SegmentSequence
    assert (liver.SegmentLabel, lesion.SegmentLabel) == ("Liver", "lesion_left")
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SNOMED CT Liver
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SNOMED CT Lesion
    assert lesion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # morphologically abnormal
    for item in (liver, lesion):
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("medseg", medseg.__version__)
        assert "Dataset9 2 x unet" in algorithm.AlgorithmParameters
    rgb = hd.color.CIELabColor.from_dicom_value(tuple(liver.RecommendedDisplayCIELabValue)).to_rgb()
    assert np.abs(np.subtract(rgb, (221, 130, 101))).max() <= 2
    assert "Dataset9 2 x unet" in seg.ContentDescription and seg.ManufacturerModelName == "Dataset9 2 x unet"


def test_unknown_name_gets_the_generic_code(tmp_path):
    files = copy_series("ct_3slice", tmp_path / "ct")
    labels = np.zeros((3, 512, 512), np.uint8)
    labels[0, :10, :10] = 7
    written = write_dicom_seg(labels, files, {}, tmp_path / "seg.dcm", model_id="m")
    (segment,) = hd.seg.segread(written.path).SegmentSequence
    assert segment.SegmentLabel == "label 7" and written.segments == {7: 1}
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"


def test_empty_label_map_writes_nothing(tmp_path, caplog):
    files = copy_series("ct_3slice", tmp_path / "ct")
    out = tmp_path / "seg.dcm"
    with caplog.at_level("INFO"):
        assert write_dicom_seg(np.zeros((3, 512, 512), np.uint8), files, NAMES, out, model_id="m") is None
    assert not out.exists() and "no foreground" in caplog.text


def test_bad_input_is_named(tmp_path):
    files = copy_series("ct_3slice", tmp_path / "ct")
    labels = _labels_with_lesion()
    with pytest.raises(DicomError, match=r"shape \(2, 512, 512\).*\(3, 512, 512\)"):
        write_dicom_seg(labels[:2], files, NAMES, tmp_path / "a.dcm", model_id="m")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(DicomError, match="junk.dcm: not a DICOM file"):
        write_dicom_seg(labels, [*files, junk], NAMES, tmp_path / "a.dcm", model_id="m")
    other = copy_series("rtstruct_ct", tmp_path / "other")
    with pytest.raises(DicomError, match="do not form one series"):
        write_dicom_seg(labels, [*files[:2], other[0]], NAMES, tmp_path / "a.dcm", model_id="m")
    with pytest.raises(DicomError, match="two slices at the same position"):
        write_dicom_seg(labels, [files[0], *files], NAMES, tmp_path / "a.dcm", model_id="m")
    seg = tmp_path / "liver_seg.dcm"
    shutil.copy(dicom_data() / "liver_seg.dcm", seg)
    with pytest.raises(DicomError, match=r"liver_seg.dcm: not a DICOM image \(Segmentation Storage\)"):
        write_dicom_seg(labels, [*files, seg], NAMES, tmp_path / "a.dcm", model_id="m")
    multi = pydicom.dcmread(files[0])
    multi.NumberOfFrames = 2
    multi.save_as(tmp_path / "multi.dcm")
    with pytest.raises(
        DicomError, match="multi.dcm: a multi-frame image; DICOM output supports series of single-frame"
    ):
        write_dicom_seg(labels, [*files[1:], tmp_path / "multi.dcm"], NAMES, tmp_path / "a.dcm", model_id="m")
    assert not (tmp_path / "a.dcm").exists()
