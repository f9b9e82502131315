"""DICOM series + SEG/RTSTRUCT -> dataset folder: label maps on the CT's grid, overlaps, one reader per kind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io import dicom_annotations
from medseg.io.dataset import load_dataset
from medseg.io.dicom_annotations import SegmentMasks
from medseg.io.dicom_convert import LabelTable, convert_dicom
from medseg.io.dicom_series import read_series_image, scan_dicom_folder
from medseg.io.validation import validate_dataset
from medseg.options import SegmentOverlaps

from ._dicom_builders import DICOM, write_series


def _ct_with(tmp_path: Path, *objects: str) -> Path:
    folder = tmp_path / "dicom"
    shutil.copytree(DICOM / "ct_3slice", folder / "ct")
    for name in objects:
        shutil.copy(DICOM / name, folder / name)
    return folder


def test_liver_seg_gives_the_reference_label_map_on_the_ct_grid(tmp_path):
    out = tmp_path / "ds"
    result = convert_dicom(_ct_with(tmp_path, "liver_seg.dcm"), out)
    assert result.ok and result.written == ["99000_s2"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "Liver": 1} and meta["channel_names"] == {"0": "CT"}
    ds = load_dataset(out)
    validate_dataset(ds, progress=False)  # what medseg plan checks first
    (case,) = ds.cases
    ref = sitk.ReadImage(str(DICOM / "liver_seg_reference.nrrd"))
    label, image = sitk.ReadImage(str(case.label_file)), sitk.ReadImage(str(case.image_files[0]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(ref))
    for written in (label, image):  # NIfTI stores origin and spacing as float32
        assert written.GetSize() == ref.GetSize() and written.GetDirection() == ref.GetDirection()
        np.testing.assert_allclose(written.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    hu, _ = read_series_image(scan_dicom_folder(tmp_path / "dicom").series[0])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)


def test_seg_without_source_references_is_placed_by_position(tmp_path):
    src = _ct_with(tmp_path)
    seg = pydicom.dcmread(DICOM / "liver_seg.dcm")
    for frame in seg.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
    seg.save_as(src / "liver_noref.dcm")
    assert convert_dicom(src, tmp_path / "ds").ok
    label = sitk.ReadImage(str(tmp_path / "ds" / "labelsTr" / "99000_s2.nii.gz"))
    ref = sitk.ReadImage(str(DICOM / "liver_seg_reference.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(ref))
    seg.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient[2] = -100.0
    seg.save_as(src / "liver_noref.dcm")
    with pytest.raises(MedsegError, match=r"frame 2 at .* lies on no slice of series 99000_s2"):
        convert_dicom(src, tmp_path / "ds2")


def _segments(path: Path, uids: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    seg = hd.seg.segread(path)
    masks = seg.get_pixels_by_source_instance(
        list(uids), combine_segments=False, assert_missing_frames_are_empty=True, ignore_spatial_locations=True
    )
    return [str(d.SegmentLabel) for d in seg.SegmentSequence], masks.astype(bool)


def test_overlapping_segments_error_names_them(tmp_path):
    with pytest.raises(MedsegError, match=r"segments overlap: 'GREEN' and 'ORANGE' \(\d+ voxels\).*--overlaps regions"):
        convert_dicom(_ct_with(tmp_path, "partial_overlaps_seg.dcm"), tmp_path / "ds")
    assert not (tmp_path / "ds" / "dataset.json").exists()


def test_overlapping_segments_as_regions_reproduce_every_segment(tmp_path):
    src = _ct_with(tmp_path, "partial_overlaps_seg.dcm")
    out = tmp_path / "ds"
    assert convert_dicom(src, out, overlaps="regions").ok
    ds = load_dataset(out)
    validate_dataset(ds, progress=False)
    names, masks = _segments(src / "partial_overlaps_seg.dcm", scan_dicom_folder(src).series[0].sop_instance_uids)
    region_names = [n for n in json.loads((out / "dataset.json").read_text())["labels"] if n != "background"]
    assert region_names == names and len(ds.regions) == len(names)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ds.cases[0].label_file)))
    assert (masks.sum(-1) > 1).any()  # the data really overlaps
    for k, region in enumerate(ds.regions):
        np.testing.assert_array_equal(np.isin(labels, region), masks[..., k], err_msg=names[k])
    assert ds.regions_class_order[: len(names)] == tuple(range(1, len(names) + 1))


def test_annotation_reader_per_kind_plugs_in(tmp_path, monkeypatch):
    src = tmp_path / "dicom"
    shutil.copytree(DICOM / "rtstruct_ct", src)
    seen = []

    def fake(path: Path, series) -> SegmentMasks:
        seen.append((path.name, series.case_id, len(series.files)))
        masks = np.zeros((len(series.files), 512, 512, 2), bool)
        masks[:, 10:20, 10:30, 0] = True
        masks[1, 100:110, 50:60, 1] = True
        return SegmentMasks(masks, ("ROI-1", "Cord"))

    monkeypatch.setitem(dicom_annotations.ANNOTATION_READERS, "RTSTRUCT", fake)
    result = convert_dicom(src, tmp_path / "ds")
    assert seen == [("rtstruct.dcm", "PHANTOM_EXAMPLE_PHANTOM_EXAMPLE_s3", 2)]
    assert result.written == ["PHANTOM_EXAMPLE_PHANTOM_EXAMPLE_s3"] and result.labels == {
        "background": 0,
        "ROI-1": 1,
        "Cord": 2,
    }
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(load_dataset(tmp_path / "ds").cases[0].label_file)))
    assert (labels == 1).sum() == 2 * 10 * 20 and (labels == 2).sum() == 100


def test_rtstruct_converts_to_a_mask_on_its_ct(tmp_path):
    src = tmp_path / "dicom"
    shutil.copytree(DICOM / "rtstruct_ct", src)
    result = convert_dicom(src, tmp_path / "ds")
    assert result.ok and len(result.written) == 1
    case = result.written[0]
    labels = sitk.ReadImage(str(tmp_path / "ds" / "labelsTr" / f"{case}.nii.gz"))
    image = sitk.ReadImage(str(tmp_path / "ds" / "imagesTr" / f"{case}_0000.nii.gz"))
    assert labels.GetSize() == image.GetSize() and labels.GetOrigin() == image.GetOrigin()
    array = sitk.GetArrayFromImage(labels)
    assert set(np.unique(array).tolist()) == {0, 1} and int((array == 1).sum()) > 100
    names = json.loads((tmp_path / "ds" / "dataset.json").read_text())["labels"]
    assert names["background"] == 0 and len(names) == 2


def test_unannotated_series_left_out_and_a_doubly_annotated_one_refused(tmp_path):
    src = _ct_with(tmp_path, "liver_seg.dcm")
    write_series(src / "other", [0.0, 1.0, 2.0], description="no annotation")
    result = convert_dicom(src, tmp_path / "ds")
    assert result.ok and result.written == ["99000_s2"]
    assert any("P1_no_annotation_s7" in line and "left out" in line for line in result.skipped)
    shutil.copy(DICOM / "partial_overlaps_seg.dcm", src / "second.dcm")
    with pytest.raises(MedsegError, match=r"series 99000_s2: 2 annotation objects .*second\.dcm.*keep one per series"):
        convert_dicom(src, tmp_path / "ds2")


def test_label_ids_follow_segment_names_across_cases():
    table = LabelTable(SegmentOverlaps.ERROR)
    a = np.zeros((1, 2, 3, 2), bool)
    a[0, 0, 0, 0] = a[0, 1, 2, 1] = True
    first = table.label_map(SegmentMasks(a, ("liver", "spleen")), Path("a.dcm"))
    second = table.label_map(SegmentMasks(a, ("kidney", "liver")), Path("b.dcm"))
    assert first[0, 0, 0] == 1 and first[0, 1, 2] == 2
    assert second[0, 0, 0] == 3 and second[0, 1, 2] == 1
    assert table.labels_json() == ({"background": 0, "liver": 1, "spleen": 2, "kidney": 3}, None)


def test_refuses_output_inside_input_and_an_existing_dataset(tmp_path):
    src = _ct_with(tmp_path, "liver_seg.dcm")
    with pytest.raises(MedsegError, match="must not be inside the DICOM folder"):
        convert_dicom(src, src / "ds")
    assert convert_dicom(src, tmp_path / "ds").ok
    with pytest.raises(MedsegError, match="--overwrite"):
        convert_dicom(src, tmp_path / "ds")
    assert convert_dicom(src, tmp_path / "ds", overwrite=True).ok
