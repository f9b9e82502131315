"""``predict --output-format dicom-seg|rtstruct``: :class:`~medseg.inference.dicom_output.DicomOutputWriter` as the
case hook of :func:`~medseg.inference.folder.predict_folder`, on a (cropped) copy of the real 3-slice CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import ConfigError, DicomError
from medseg.inference import predict_folder
from medseg.inference.case_output import FinishedCase
from medseg.inference.dicom_output import DicomOutputWriter, dicom_output_path
from medseg.io.image import ImageGeometry
from medseg.io.rtstruct_reader import rasterise_rtstruct
from medseg.options import OutputFormat
from tests.unit.io._dicom import copy_series, crop_series, decode_with_highdicom, decode_with_pydicom, sorted_slices

from .conftest import threshold_predictor


def _series_as_nifti(tmp_path: Path) -> tuple[list[Path], Path]:
    """A 3 x 40 x 48 crop of ``ct_3slice`` (liver and its border) as DICOM files, and the same image as ``in/ct_0000.nii.gz`` read by
    SimpleITK's series reader (what DICOM input to predict does)."""
    files = copy_series("ct_3slice", tmp_path / "dicom")
    crop_series(files, slice(240, 280), slice(120, 168))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom")))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(reader.Execute(), str(tmp_path / "in" / "ct_0000.nii.gz"))
    return files, tmp_path / "in"


@pytest.mark.parametrize("output_format", [OutputFormat.DICOM_SEG, OutputFormat.RTSTRUCT])
def test_predicted_dicom_matches_the_nifti_label_map(tmp_path, output_format):
    files, input_dir = _series_as_nifti(tmp_path)
    asked = []
    writer = DicomOutputWriter(
        output_format,
        lambda case: asked.append(case) or (files if case == "ct" else None),
        {0: "background", 5: "liver"},
        "test model",
    )
    result = predict_folder(input_dir, tmp_path / "out", threshold_predictor(), case_hook=writer, progress=False)
    assert result.ok and asked == ["ct"]
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "ct.nii.gz")))
    assert set(np.unique(nifti)) == {0, 5}  # something to write, not everything
    target = tmp_path / "out" / ("ct_seg.dcm" if output_format == OutputFormat.DICOM_SEG else "ct_rtstruct.dcm")
    assert writer.written == {"ct": target} and not writer.empty
    if output_format == OutputFormat.DICOM_SEG:
        slices = sorted_slices(files)
        uids = [str(s.SOPInstanceUID) for s in slices]
        np.testing.assert_array_equal(decode_with_highdicom(target, uids, {"liver": 5}), nifti)
        np.testing.assert_array_equal(decode_with_pydicom(target, slices, {"liver": 5}), nifti)
    else:
        labels, names = rasterise_rtstruct(target, files)
        assert names == ["liver"]
        np.testing.assert_array_equal(np.where(labels == 1, 5, 0), nifti)


def _case(tmp_path: Path, labels: np.ndarray, geometry: ImageGeometry) -> FinishedCase:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return FinishedCase("ct", labels, geometry, (0, 1), None, out / "ct.nii.gz", tmp_path / "in" / "ct_0000.nii.gz")


def test_reversed_stack_and_foreign_geometry(tmp_path):
    files, input_dir = _series_as_nifti(tmp_path)
    image = sitk.ReadImage(str(input_dir / "ct_0000.nii.gz"))
    geometry = ImageGeometry.from_sitk(image)
    labels = np.zeros(geometry.shape, np.uint8)
    labels[0, 5:20, 10:30] = 1
    labels[2, 1:3, 1:3] = 1
    writer = DicomOutputWriter("dicom-seg", lambda case: files, {1: "liver"}, "m")
    # the same volume stacked the other way: origin at the last slice, z direction reversed
    direction = np.asarray(geometry.direction).reshape(3, 3).copy()
    direction[:, 2] *= -1
    last = np.asarray(geometry.origin) + (geometry.shape[0] - 1) * geometry.spacing[0] * -direction[:, 2]
    flipped = ImageGeometry(geometry.shape, geometry.spacing, tuple(last), tuple(direction.ravel()))
    writer(_case(tmp_path, labels[::-1].copy(), flipped))
    slices = sorted_slices(files)
    decoded = decode_with_pydicom(tmp_path / "out" / "ct_seg.dcm", slices, {"liver": 1})
    np.testing.assert_array_equal(decoded, labels)
    moved = ImageGeometry(geometry.shape, geometry.spacing, (0.0, 0.0, 0.0), geometry.direction)
    with pytest.raises(DicomError, match="ct: the image's origin .* do not match"):
        writer(_case(tmp_path, labels, moved))


def test_case_not_from_dicom_and_empty_case(tmp_path, caplog):
    files, input_dir = _series_as_nifti(tmp_path)
    geometry = ImageGeometry.from_sitk(sitk.ReadImage(str(input_dir / "ct_0000.nii.gz")))
    labels = np.zeros(geometry.shape, np.uint8)
    with pytest.raises(DicomError, match="ct: --output-format rtstruct needs DICOM input series"):
        DicomOutputWriter("rtstruct", lambda case: None, {}, "m")(_case(tmp_path, labels, geometry))
    writer = DicomOutputWriter("rtstruct", lambda case: files, {}, "m")
    labels[1, 3, 3] = 1
    writer(_case(tmp_path, labels, geometry))
    assert writer.written == {"ct": tmp_path / "out" / "ct_rtstruct.dcm"}
    labels[1, 3, 3] = 0  # predicted again (--overwrite), now empty: the earlier object goes
    writer = DicomOutputWriter("rtstruct", lambda case: files, {}, "m")
    writer(_case(tmp_path, labels, geometry))
    assert writer.empty == ["ct"] and not writer.written and "no foreground" in caplog.text
    assert not list((tmp_path / "out").iterdir())
    with pytest.raises(ConfigError, match="nifti writes no DICOM"):
        DicomOutputWriter("nifti", lambda case: files, {}, "m")


def test_dicom_output_path():
    assert dicom_output_path(Path("o/a.b.nii.gz"), OutputFormat.DICOM_SEG) == Path("o/a.b_seg.dcm")
    assert dicom_output_path(Path("o/c.nrrd"), OutputFormat.RTSTRUCT) == Path("o/c_rtstruct.dcm")
