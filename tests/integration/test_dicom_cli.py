"""DICOM through the real CLI: ``medseg convert`` (SEG -> dataset, overlap error, region labels) and ``medseg
predict`` on a DICOM folder with a tiny trained model (one NIfTI per series, the series' geometry)."""

from __future__ import annotations

import json
import shutil

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from medseg.io.dicom_series import read_series_image, scan_dicom_folder
from tests.helpers import TINY_TRAIN, shrink_networks
from tests.unit.io._dicom_builders import DICOM, write_series

pytestmark = pytest.mark.slow


def test_convert_cli(tmp_path, capsys):
    src = tmp_path / "dicom"
    shutil.copytree(DICOM / "ct_3slice", src / "ct")
    shutil.copy(DICOM / "partial_overlaps_seg.dcm", src)
    assert main(["convert", str(src), "-o", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "medseg convert: error:" in err and "'GREEN' and 'ORANGE'" in err and "Traceback" not in err
    assert main(["convert", str(src), "-o", str(tmp_path / "regions"), "--overlaps", "regions"]) == 0
    assert json.loads((tmp_path / "regions" / "dataset.json").read_text())["labels"]["GREEN"][0] == 1
    (src / "partial_overlaps_seg.dcm").unlink()
    shutil.copy(DICOM / "liver_seg.dcm", src)
    assert main(["convert", str(src), "-o", str(tmp_path / "liver")]) == 0
    assert "converted 1 case(s)" in capsys.readouterr().out
    label = sitk.ReadImage(str(tmp_path / "liver" / "labelsTr" / "99000_s2.nii.gz"))
    ref = sitk.ReadImage(str(DICOM / "liver_seg_reference.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(ref))


def test_predict_dicom_folder_cli(tmp_path, synthetic_dataset, capsys):
    work = tmp_path / "work"
    assert main(["plan", str(synthetic_dataset), "-o", str(work), "--num-workers", "1", "--configs", "3d_fullres"]) == 0
    shrink_networks(work)
    assert main(["train", str(work), "--fold", "0", *TINY_TRAIN, "--no-validation"]) == 0
    images = tmp_path / "dicom"
    write_series(images / "study" / "series_a", [0.0, 3.0, 6.0, 9.0], shape=(30, 26), description="axial")
    write_series(images / "study" / "series_b", [0.0, 3.0, 9.0], description="gap")
    shutil.copy(DICOM / "rtstruct_ct" / "rtstruct.dcm", images / "rtstruct.dcm")
    capsys.readouterr()
    out = tmp_path / "out"
    outputs = ["--output-format", "dicom-seg", "--statistics", "--preview"]
    assert main(["predict", "-i", str(images), "-o", str(out), "-m", str(work), "--device", "cpu", *outputs]) == 1
    summary = capsys.readouterr().out
    assert "predicted 1 case(s)" in summary and "P1_gap_s7" in summary and "unevenly spaced" in summary
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["P1_axial_s7.nii.gz"]
    series = next(s for s in scan_dicom_folder(images).series if s.case_id == "P1_axial_s7")
    _, geometry = read_series_image(series)
    seg = sitk.ReadImage(str(out / "P1_axial_s7.nii.gz"))
    assert tuple(reversed(seg.GetSize())) == geometry.shape and seg.GetDirection() == geometry.direction
    np.testing.assert_allclose(seg.GetOrigin(), geometry.origin, atol=1e-4)  # NIfTI: float32 origin
    np.testing.assert_allclose(tuple(reversed(seg.GetSpacing())), geometry.spacing, atol=1e-5)
    declared = {int(k) for k in json.loads((synthetic_dataset / "dataset.json").read_text())["labels"]}
    labels = sitk.GetArrayFromImage(seg)
    assert set(np.unique(labels).tolist()) <= declared
    statistics = json.loads((out / "statistics.json").read_text())["cases"]
    assert list(statistics) == ["P1_axial_s7"]  # the whole series was read for the intensities, not one slice
    voxels = {s["label"]: s["voxels"] for s in statistics["P1_axial_s7"]["structures"]}
    assert all(voxels[k] == int((labels == k).sum()) for k in declared - {0})
    assert (out / "previews" / "P1_axial_s7.png").is_file()
    seg_file = out / "P1_axial_s7_seg.dcm"
    if labels.any():  # the SEG decodes back to exactly the NIfTI label map
        decoded = hd.seg.segread(seg_file).get_volume(combine_segments=True, relabel=False)
        assert seg_file.is_file() and decoded is not None
        numbers = {int(d.SegmentNumber): d.SegmentLabel for d in hd.seg.segread(seg_file).SegmentSequence}
        assert len(numbers) == len(set(np.unique(labels).tolist()) - {0})
    else:  # no foreground: no SEG (it cannot hold zero segments), and the summary says so
        assert not seg_file.exists() and "without foreground" in summary
