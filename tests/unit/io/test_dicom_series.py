"""DICOM folders: series grouping and slice order, exact geometry, bad series reported one line each."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.io.dicom_series import DicomSeriesError, read_series_datasets, read_series_image, scan_dicom_folder

from ._dicom_builders import DICOM, TEMPLATE, write_series, write_slice


def test_real_folder_series_objects_and_geometry_of_the_reference():
    scan = scan_dicom_folder(DICOM)
    assert not scan.failed
    assert [s.case_id for s in scan.series] == ["99000_s2", "PHANTOM_EXAMPLE_PHANTOM_EXAMPLE_s3"]
    assert sorted(o.modality for o in scan.objects) == ["RTSTRUCT", "SEG", "SEG"]
    assert {p.name for p in scan.not_dicom} == {"LICENSE_dcmqi.txt", "LICENSE_rt-utils.txt", "liver_seg_reference.nrrd"}
    ct, rt_ct = scan.series
    # slices ordered along the normal (0, 0, 1): 03.dcm lies lowest (z = -128.69)
    assert [f.name for f in ct.files] == ["03.dcm", "02.dcm", "01.dcm"]
    heads = read_series_datasets(ct, pixels=False)
    assert [h.SOPInstanceUID for h in heads] == list(ct.sop_instance_uids)
    array, geometry = read_series_image(ct)
    ref = sitk.ReadImage(str(DICOM / "liver_seg_reference.nrrd"))
    assert geometry.shape == tuple(reversed(ref.GetSize()))
    np.testing.assert_allclose(geometry.origin, ref.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(geometry.spacing, tuple(reversed(ref.GetSpacing())), atol=1e-5)
    assert geometry.direction == ref.GetDirection()
    for z, f in enumerate(ct.files):  # index z of the array is files[z], in HU
        ds = pydicom.dcmread(f)
        np.testing.assert_array_equal(array[z], ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    rt = next(o for o in scan.objects if o.modality == "RTSTRUCT")
    assert rt.referenced_series_uids == (rt_ct.series_uid,)
    rt_array, rt_geometry = read_series_image(rt_ct)
    assert rt_array.shape == (2, 512, 512) and rt_geometry.spacing[0] == pytest.approx(5.0)


def test_synthetic_series_volume_order_and_geometry(tmp_path):
    uid, hu = write_series(tmp_path / "a", [4.0, -1.0, 1.5, 6.5], description="chest/abd 1:2")
    (series,) = scan_dicom_folder(tmp_path).series
    assert series.series_uid == uid and series.case_id == "P1_chest_abd_1_2_s7"
    array, geometry = read_series_image(series)
    np.testing.assert_array_equal(array, hu)
    assert geometry.origin == (-10.0, 20.0, -1.0) and geometry.spacing[0] == pytest.approx(2.5)
    zs = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in series.files]
    assert zs == sorted(zs)


def test_reversed_normal_keeps_a_right_handed_stack(tmp_path):
    # rows along -x: normal = (-1, 0, 0) x (0, 1, 0) = (0, 0, -1); the stack runs along the normal
    orient = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    write_series(tmp_path, [0.0, 3.0, 6.0], orientations=[orient] * 3)
    (series,) = scan_dicom_folder(tmp_path).series
    _, geometry = read_series_image(series)
    assert geometry.origin[2] == 6.0 and geometry.spacing[0] == pytest.approx(3.0)
    assert np.allclose(np.asarray(geometry.direction).reshape(3, 3)[:, 2], (0, 0, -1))


def test_multiframe_object_is_one_series(tmp_path):
    stored = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    write_slice(tmp_path / "mf.dcm", stored, (0.0, 0.0, 0.0), pydicom.uid.generate_uid())
    (series,) = scan_dicom_folder(tmp_path).series
    assert series.number_of_frames == 3 and len(series.files) == 1
    array, geometry = read_series_image(series)
    assert geometry.shape == (3, 4, 5)
    np.testing.assert_array_equal(array, stored.astype(np.int32) - 1024)


def test_mixed_folder_bad_series_named_and_the_others_kept(tmp_path):
    shutil.copytree(DICOM / "ct_3slice", tmp_path / "ct")
    (tmp_path / "objects").mkdir()
    shutil.copy(DICOM / "liver_seg.dcm", tmp_path / "objects" / "seg.dcm")
    (tmp_path / "notes.txt").write_text("not DICOM")
    (tmp_path / "broken.dcm").write_bytes(TEMPLATE.read_bytes()[:300])  # header cut before the series UID
    dicomdir = pydicom.Dataset()
    dicomdir.file_meta = pydicom.dataset.FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dicomdir.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dicomdir.FileSetID = "EXPORT"
    dicomdir.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    gap_uid, _ = write_series(tmp_path / "gap", [0.0, 2.0, 6.0, 8.0], description="gap")  # slice z=4 missing
    tilt = (1.0, 0.0, 0.0, 0.0, 0.98, 0.2)
    mixed_uid, _ = write_series(tmp_path / "mixed", [0.0, 2.0, 4.0], orientations=[tilt, *[(1, 0, 0, 0, 1, 0)] * 2])
    dup_uid, _ = write_series(tmp_path / "dup", [0.0, 2.0, 2.0], description="dup")
    scan = scan_dicom_folder(tmp_path)
    assert [s.case_id for s in scan.series] == ["99000_s2"]
    assert [o.path.name for o in scan.objects] == ["DICOMDIR", "seg.dcm"] and scan.objects[1].modality == "SEG"
    assert scan.objects[0].kind == "Media Storage Directory Storage"
    assert [p.name for p in scan.not_dicom] == ["notes.txt"]
    messages = dict(scan.failed)
    assert len(messages) == 4
    gap = next(m for m in messages.values() if gap_uid in m)
    assert "P1_gap_s7" in gap and "unevenly spaced" in gap and "missing" in gap
    assert "mixed orientations" in next(m for m in messages.values() if mixed_uid in m)
    assert "share a position" in next(m for m in messages.values() if dup_uid in m)
    assert "broken.dcm" in next(m for k, m in messages.items() if k.endswith("broken.dcm"))
    assert scan.failed_series_uids == {gap_uid, mixed_uid, dup_uid}


def test_truncated_pixel_data_names_series_and_file(tmp_path):
    write_series(tmp_path, [0.0, 1.0, 2.0], shape=(8, 8))
    victim = sorted(tmp_path.glob("*.dcm"))[1]
    victim.write_bytes(victim.read_bytes()[:-40])
    (series,) = scan_dicom_folder(tmp_path).series
    with pytest.raises(DicomSeriesError, match=rf"series P1_synthetic_s7 .*{victim.name}: truncated pixel data"):
        read_series_image(series)


def test_case_ids_unique_and_filesystem_safe(tmp_path):
    for k in range(3):
        write_series(tmp_path / f"s{k}", [0.0, 1.0], patient="Doe^John", description="T1 / post", seed=k)
    ids = [s.case_id for s in scan_dicom_folder(tmp_path).series]
    assert sorted(ids) == ["Doe_John_T1_post_s7", "Doe_John_T1_post_s7_2", "Doe_John_T1_post_s7_3"]


def test_rounded_positions_pass_and_a_real_spacing_change_fails(tmp_path):
    write_series(tmp_path / "rounded", [0.0, 0.63, 1.25, 1.88, 2.5], description="rounded")  # 0.625 mm, 2 decimals
    write_series(tmp_path / "stretched", [0.0, 1.0, 2.0, 3.1], description="stretched")
    scan = scan_dicom_folder(tmp_path)
    assert [s.case_id for s in scan.series] == ["P1_rounded_s7"]
    assert list(scan.failed) == ["P1_stretched_s7"] and "gaps 1.000 to 1.100 mm" in scan.failed["P1_stretched_s7"]
