"""predict_folder on DICOM folders: each image series a case, written with the series' geometry; annotations
and non-DICOM files skipped; a bad series fails alone; the hook gets the series' files."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.inference import predict_folder
from medseg.inference.case_output import FinishedCase
from medseg.io.dicom_series import read_series_image, scan_dicom_folder
from medseg.io.image import write_image
from tests.unit.io._dicom_builders import DICOM, write_series

from .conftest import threshold_predictor


def _assert_series_geometry(path, geometry):
    out = sitk.ReadImage(str(path))
    assert tuple(reversed(out.GetSize())) == geometry.shape
    assert out.GetDirection() == pytest.approx(geometry.direction, abs=1e-6)
    # NIfTI keeps origin and spacing as float32
    np.testing.assert_allclose(out.GetOrigin(), geometry.origin, atol=1e-4)
    np.testing.assert_allclose(tuple(reversed(out.GetSpacing())), geometry.spacing, atol=1e-5)


def test_rtstruct_folder_predicts_its_ct_and_skips_the_annotation(tmp_path, caplog):
    src = tmp_path / "in"
    shutil.copytree(DICOM / "rtstruct_ct", src)
    (src / "readme.txt").write_text("exported from the TPS")
    finished: list[FinishedCase] = []
    with caplog.at_level(logging.INFO):
        result = predict_folder(src, tmp_path / "out", threshold_predictor(), progress=False, case_hook=finished.append)
    assert result.ok and result.written == ["PHANTOM_EXAMPLE_PHANTOM_EXAMPLE_s3"]
    assert any("rtstruct.dcm: skipped" in r.getMessage() and "RTSTRUCT" in r.getMessage() for r in caplog.records)
    assert [w for w in result.warnings if "not DICOM" in w and "readme.txt" in w]
    (series,) = scan_dicom_folder(src).series
    image, geometry = read_series_image(series)
    seg_path = tmp_path / "out" / "PHANTOM_EXAMPLE_PHANTOM_EXAMPLE_s3.nii.gz"
    _assert_series_geometry(seg_path, geometry)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_path)))
    assert set(np.unique(seg)) <= {0, 5} and (seg == 5).any() and (seg == 0).any()
    (case,) = finished
    assert case.source_series == series and [f.name for f in case.source_series.files] == ["ct_1.dcm", "ct_2.dcm"]
    assert case.labels.shape == image.shape and case.geometry == geometry
    assert sorted(p.name for p in src.iterdir()) == ["ct_1.dcm", "ct_2.dcm", "readme.txt", "rtstruct.dcm"]


def test_mixed_folder_bad_series_fails_alone(tmp_path):
    src = tmp_path / "in"
    shutil.copytree(DICOM / "ct_3slice", src / "a" / "ct")
    shutil.copy(DICOM / "liver_seg.dcm", src / "liver_seg.dcm")
    gap_uid, _ = write_series(src / "b", [0.0, 2.0, 6.0], description="gap")
    _, hu = write_series(src / "c", [0.0, 2.0, 4.0], shape=(20, 24), description="small", seed=3)
    result = predict_folder(src, tmp_path / "out", threshold_predictor(), progress=False)
    assert sorted(result.written) == ["99000_s2", "P1_small_s7"]
    ((name, message),) = result.failed.items()
    assert name == "P1_gap_s7" and "unevenly spaced" in message and gap_uid in message
    small = tmp_path / "out" / "P1_small_s7.nii.gz"
    assert sitk.ReadImage(str(small)).GetSize() == (24, 20, 3)
    # the same volume given as NIfTI is segmented identically
    series = next(s for s in scan_dicom_folder(src).series if s.case_id == "P1_small_s7")
    volume, geometry = read_series_image(series)
    np.testing.assert_array_equal(volume, hu)
    write_image(volume, geometry, tmp_path / "nifti" / "small.nii.gz")
    assert predict_folder(tmp_path / "nifti", tmp_path / "out2", threshold_predictor(), progress=False).ok
    _assert_series_geometry(small, geometry)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(small))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out2" / "small.nii.gz"))),
    )


def test_dicom_needs_a_one_channel_model(tmp_path):
    write_series(tmp_path / "in", [0.0, 1.0])
    with pytest.raises(MedsegError, match="one channel per series, the model expects 2"):
        predict_folder(tmp_path / "in", tmp_path / "out", threshold_predictor(channels=2), progress=False)


def test_folder_of_only_annotations_has_no_images(tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copy(DICOM / "liver_seg.dcm", tmp_path / "in" / "seg.dcm")
    with pytest.raises(MedsegError, match="no images found"):
        predict_folder(tmp_path / "in", tmp_path / "out", threshold_predictor(), progress=False)
