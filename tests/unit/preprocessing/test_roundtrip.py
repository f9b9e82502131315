"""Geometry is kept exactly through read -> preprocess -> revert -> export (oblique, anisotropic images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.image import read_channels, read_image
from medseg.preprocessing import export_segmentation, preprocess_case, revert_to_original
from medseg.preprocessing.case import preprocessing_fingerprint

from .conftest import blob_case, build_plan, write_nifti

SPACING = (2.5, 0.8, 0.9)  # (Z, Y, X) mm; z/y = 3.1 > 3: anisotropic


def _write_pair(tmp_path: Path, label_ids=(0, 1, 2), shape=(16, 40, 36)):
    image, label = blob_case(shape=shape, seed=3, label_ids=label_ids)
    img = write_nifti(tmp_path / "img.nii.gz", image, SPACING, origin=(-12.5, 40.25, 7.0))
    lab = write_nifti(tmp_path / "lab.nii.gz", label.astype(np.uint8), SPACING, origin=(-12.5, 40.25, 7.0))
    return img, lab


def _onehot(seg: np.ndarray, k: int) -> np.ndarray:
    return (np.arange(k)[:, None, None, None] == seg[None]).astype(np.float32)


def _assert_same_geometry(a: Path, b: Path):
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ia.GetSize() == ib.GetSize()
    assert ia.GetOrigin() == ib.GetOrigin()
    assert ia.GetSpacing() == ib.GetSpacing()
    # NIfTI stores the orientation in float32: SimpleITK's own write/read cycle moves direction cosines by
    # ~3e-8 each time, so exactness is only possible up to that precision.
    np.testing.assert_allclose(ia.GetDirection(), ib.GetDirection(), rtol=0, atol=1e-6)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("label_ids", [(0, 1, 2), (0, 5, 117)])
def test_identity_spacing_round_trip_is_exact(tmp_path, label_ids):
    img_path, lab_path = _write_pair(tmp_path, label_ids)
    image, geometry = read_channels([img_path])
    label, _ = read_image(lab_path)
    plan = build_plan(spacing=SPACING, label_ids=label_ids)
    data, seg, props = preprocess_case(image, geometry, label, plan, "3d_fullres", case_id="c0")

    assert props.bbox == ((2, 14), (2, 38), (2, 34))  # the zero frame is cropped
    assert data.shape == (1, 12, 36, 32) and data.dtype == np.float32
    assert props.shape_after_resample == props.shape_after_crop == (12, 36, 32)
    np.testing.assert_allclose(props.spacing_after_resample, SPACING, rtol=1e-6)  # NIfTI spacing is float32
    assert props.fingerprint == preprocessing_fingerprint(plan, "3d_fullres")
    assert all(seg[tuple(c)] == k for k, locs in props.class_locations.items() for c in locs)

    probs = revert_to_original(_onehot(seg, 3), props)
    assert probs.shape == (3, *geometry.shape)
    assert np.all(probs[0, :2] == 1) and np.all(probs[1:, :2] == 0)  # outside the crop: background
    out = tmp_path / "pred.nii.gz"
    export_segmentation(probs.argmax(0), props, plan.label_ids, out)
    _assert_same_geometry(out, lab_path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), label)
    # the class-index path gives the same map
    np.testing.assert_array_equal(revert_to_original(seg, props, is_seg=True), labels_index(label, label_ids))


def labels_index(label, label_ids):
    return np.searchsorted(np.asarray(label_ids), label)


def test_resampled_round_trip_keeps_geometry_and_labels(tmp_path):
    img_path, lab_path = _write_pair(tmp_path)
    image, geometry = read_channels([img_path])
    label, _ = read_image(lab_path)
    plan = build_plan(spacing=(1.5, 1.0, 1.0))
    data, seg, props = preprocess_case(image, geometry, label, plan, "3d_fullres", case_id="c0")
    assert props.shape_after_resample == (20, 29, 29)  # 12*2.5/1.5, 36*0.8, 32*0.9
    assert data.shape == (1, 20, 29, 29) and seg.shape == (20, 29, 29)
    np.testing.assert_allclose(props.spacing_after_resample, (1.5, 36 * 0.8 / 29, 32 * 0.9 / 29))

    for probs in (revert_to_original(_onehot(seg, 3), props).argmax(0), revert_to_original(seg, props, is_seg=True)):
        out = tmp_path / "pred.nii.gz"
        export_segmentation(probs, props, plan.label_ids, out)
        _assert_same_geometry(out, lab_path)
        back = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        for k in (1, 2):
            assert _dice(back == k, label == k) > 0.95


def test_2d_image_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = np.zeros((30, 26), dtype=np.float32)
    image[3:27, 2:24] = rng.random((24, 22)) + 1
    label = np.zeros((30, 26), dtype=np.uint8)
    label[8:20, 5:15] = 1
    src = sitk.GetImageFromArray(image)
    src.SetSpacing((0.7, 0.6))
    src.SetOrigin((3.0, -4.0))
    src.SetDirection((0.0, 1.0, 1.0, 0.0))
    path = tmp_path / "img2d.nii.gz"
    sitk.WriteImage(src, str(path))
    img, geometry = read_channels([path])
    plan = build_plan(spacing=(1.0, 0.6, 0.7), label_ids=(0, 1))
    data, seg, props = preprocess_case(img, geometry, label, plan, "3d_fullres", case_id="flat")
    assert data.shape == (1, 1, 24, 22) and props.bbox == ((0, 1), (3, 27), (2, 24))
    back = revert_to_original(seg, props, is_seg=True)
    assert back.shape == (30, 26)
    np.testing.assert_array_equal(back, label)
    assert revert_to_original(_onehot(seg, 2), props).shape == (2, 30, 26)
    out = tmp_path / "pred2d.nii.gz"
    export_segmentation(back, props, plan.label_ids, out)
    _assert_same_geometry(out, path)


def test_mismatched_inputs_are_refused(tmp_path):
    plan = build_plan()
    image, label = blob_case()
    from medseg.io.image import ImageGeometry

    geo = ImageGeometry(image.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    with pytest.raises(MedsegError, match="c9: label shape"):
        preprocess_case(image[None], geo, label[:-1], plan, "3d_fullres", case_id="c9")
    with pytest.raises(MedsegError, match="c9: label values \\[7\\]"):
        preprocess_case(image[None], geo, np.where(label == 2, 7, label), plan, "3d_fullres", case_id="c9")
    _, seg, props = preprocess_case(image[None], geo, label, plan, "3d_fullres", case_id="c9")
    with pytest.raises(ValueError, match="expected an array of shape"):
        revert_to_original(seg[:-1], props, is_seg=True)
    with pytest.raises(ValueError, match="segmentation shape"):
        export_segmentation(seg, props, plan.label_ids, tmp_path / "x.nii.gz")
