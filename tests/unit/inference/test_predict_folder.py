"""predict_folder: outputs and geometry, bad cases reported while the others are written, skip/overwrite."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.inference import EnsembleMember, Predictor, predict_folder

from .conftest import Threshold, bright_box_image, build_plan, threshold_predictor, write_oblique


@pytest.fixture
def input_dir(tmp_path):
    folder = tmp_path / "in"
    for i in range(3):
        image, _ = bright_box_image(seed=i)
        write_oblique(folder / f"case_{i}.nii.gz", image, origin=(1.0 * i, -2.0, 3.5))
    return folder


def test_writes_every_case_with_input_geometry_and_label_ids(input_dir, tmp_path):
    out = tmp_path / "out"
    res = predict_folder(input_dir, out, threshold_predictor(), save_probabilities=True, num_workers=2, progress=False)
    assert res.ok and sorted(res.written) == ["case_0", "case_1", "case_2"] and not res.failed
    for i in range(3):
        src = sitk.ReadImage(str(input_dir / f"case_{i}.nii.gz"))
        seg = sitk.ReadImage(str(out / f"case_{i}.nii.gz"))
        assert seg.GetSize() == src.GetSize() and seg.GetSpacing() == src.GetSpacing()
        assert seg.GetOrigin() == src.GetOrigin() and seg.GetDirection() == src.GetDirection()
        arr = sitk.GetArrayFromImage(seg)
        _, box = bright_box_image(seed=i)
        np.testing.assert_array_equal(arr == 5, box)
        assert set(np.unique(arr)) == {0, 5}
        with np.load(out / f"case_{i}.npz") as f:
            assert f["probabilities"].shape == (2, *arr.shape) and f["probabilities"].dtype == np.float16
    assert sorted(p.name for p in input_dir.iterdir()) == [f"case_{i}.nii.gz" for i in range(3)]  # input untouched


def test_bad_case_fails_alone_then_skip_and_overwrite(input_dir, tmp_path):
    good = (input_dir / "case_1.nii.gz").read_bytes()
    (input_dir / "case_1.nii.gz").write_bytes(good[: len(good) // 3])  # truncated
    out = tmp_path / "out"
    res = predict_folder(input_dir, out, threshold_predictor(), progress=False)
    assert not res.ok and list(res.failed) == ["case_1"]
    assert "case_1.nii.gz" in res.failed["case_1"]
    assert sorted(res.written) == ["case_0", "case_2"]
    assert "1 FAILED" in res.summary() and "case_1" in res.summary()
    assert not (out / "case_1.nii.gz").exists()

    (input_dir / "case_1.nii.gz").write_bytes(good)
    before = (out / "case_0.nii.gz").stat().st_mtime_ns
    res2 = predict_folder(input_dir, out, threshold_predictor(), progress=False)
    assert res2.ok and res2.written == ["case_1"] and sorted(res2.skipped) == ["case_0", "case_2"]
    assert (out / "case_0.nii.gz").stat().st_mtime_ns == before
    res3 = predict_folder(input_dir, out, threshold_predictor(), overwrite=True, progress=False)
    assert sorted(res3.written) == ["case_0", "case_1", "case_2"] and not res3.skipped


def test_wrong_channel_files_fail_only_that_case(tmp_path):
    folder = tmp_path / "in"
    for i in range(3):
        image, _ = bright_box_image(seed=i)
        for ch in range(2 if i != 1 else 1):  # case_1 lacks its second channel
            write_oblique(folder / f"case_{i}_{ch:04d}.nii.gz", image)
    res = predict_folder(folder, tmp_path / "out", threshold_predictor(channels=2), progress=False)
    assert list(res.failed) == ["case_1"] and "case_1_0001" in res.failed["case_1"]
    assert sorted(res.written) == ["case_0", "case_2"]
    assert (tmp_path / "out" / "case_0.nii.gz").is_file()


def test_output_inside_input_and_empty_input_refused(input_dir, tmp_path):
    with pytest.raises(MedsegError, match="must not be the input folder or inside it"):
        predict_folder(input_dir, input_dir, threshold_predictor(), progress=False)
    with pytest.raises(MedsegError, match="must not be the input folder or inside it"):
        predict_folder(input_dir, input_dir / "sub" / "out", threshold_predictor(), progress=False)
    assert not (input_dir / "sub").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedsegError, match="no images"):
        predict_folder(tmp_path / "empty", tmp_path / "out", threshold_predictor(), progress=False)
    with pytest.raises(MedsegError, match="not found"):
        predict_folder(tmp_path / "missing", tmp_path / "out", threshold_predictor(), progress=False)


def test_unusual_spacing_warns(tmp_path):
    image, _ = bright_box_image()
    write_oblique(tmp_path / "in" / "thick.nii.gz", image, spacing_zyx=(7.0, 0.8, 1.2))
    res = predict_folder(tmp_path / "in", tmp_path / "out", threshold_predictor(), progress=False)
    assert res.ok and len(res.warnings) == 1 and "far from the training data" in res.warnings[0]


def test_2d_image_with_2d_configuration(tmp_path):
    import SimpleITK as sitk

    plan = build_plan(spacings={"2d": (1.0, 0.8, 1.2)}, label_ids=(0, 3), median_spacing=(1.0, 0.8, 1.2))
    predictor = Predictor([EnsembleMember(Threshold(), plan, "2d", "unet")])
    box = np.zeros((30, 26), bool)
    box[6:16, 5:14] = True
    image = (100.0 + 100.0 * box + np.random.default_rng(0).normal(0, 1, box.shape)).astype(np.float32)
    img = sitk.GetImageFromArray(image)
    img.SetSpacing((1.2, 0.8))
    img.SetOrigin((4.0, -2.0))
    img.SetDirection((0.0, 1.0, -1.0, 0.0))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(img, str(tmp_path / "in" / "slice.nii.gz"))
    res = predict_folder(tmp_path / "in", tmp_path / "out", predictor, progress=False)
    assert res.ok, res.summary()
    src = sitk.ReadImage(str(tmp_path / "in" / "slice.nii.gz"))
    out = sitk.ReadImage(str(tmp_path / "out" / "slice.nii.gz"))
    assert out.GetDimension() == 2 and out.GetSize() == src.GetSize()
    assert out.GetOrigin() == src.GetOrigin() and out.GetDirection() == src.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out) == 3, box)
