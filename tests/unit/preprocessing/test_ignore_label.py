"""The ignore label in preprocessing: stored as class index K, kept through cropping and resampling."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io.image import ImageGeometry
from medseg.preprocessing import classes_to_labels, labels_to_classes, preprocess_case
from medseg.preprocessing.case import preprocessing_fingerprint
from medseg.preprocessing.labels import sample_class_locations

from .conftest import blob_case, build_plan


def test_ignore_id_maps_to_class_k_and_back():
    label = np.array([[0, 1, 5], [9, 9, 5]], dtype=np.uint8)
    classes = labels_to_classes(label, (0, 1, 5), ignore_label=9)
    np.testing.assert_array_equal(classes, [[0, 1, 2], [3, 3, 2]])
    assert classes.dtype == np.int8
    np.testing.assert_array_equal(classes_to_labels(classes, (0, 1, 5), ignore_label=9), label)
    with pytest.raises(ValueError, match="0..2"):  # a prediction can never hold K
        classes_to_labels(classes, (0, 1, 5))
    with pytest.raises(MedsegError, match=r"\[9\] are not declared"):
        labels_to_classes(label, (0, 1, 5))


def test_class_k_fits_the_storage_type_at_127_classes():
    ids = tuple(range(127))
    classes = labels_to_classes(np.array([0, 126, 127]), ids, ignore_label=127)
    assert classes.dtype == np.int8 and classes.tolist() == [0, 126, 127]


def test_class_locations_never_sample_ignored_voxels():
    seg = np.zeros((4, 5, 6), np.int8)
    seg[1, 1:3, 1:3] = 1
    seg[2:] = 2  # K = 2 classes (0, 1): index 2 is the ignore class
    locs = sample_class_locations(seg, 2, seed=0)
    assert set(locs) == {1} and len(locs[1]) == 4


def _ignore_plan(spacing=(1.0, 1.0, 1.0)):
    return dataclasses.replace(build_plan(spacing=spacing, label_ids=(0, 1, 2)), ignore_label=3).validate()


def test_preprocessing_keeps_the_ignore_class_through_crop_and_resampling():
    image, label = blob_case(shape=(12, 20, 18))
    label = label.astype(np.uint8)
    label[4:6][label[4:6] == 0] = 3  # two slices' background unannotated (inside the nonzero image region)
    label[7, 5:12, 4:12] = 3  # and a block overlapping the labels
    geo = ImageGeometry(
        shape=label.shape, spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel())
    )
    plan = _ignore_plan(spacing=(1.0, 0.8, 0.8))  # upsample on every axis (one-hot linear)
    data, seg, props = preprocess_case(image[None], geo, label, plan, "3d_fullres", case_id="c")
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}
    assert seg.dtype == np.int8
    frac_in = (label[2:-2, 2:-2, 2:-2] == 3).mean()
    frac_out = (seg == 3).mean()
    assert abs(frac_in - frac_out) < 0.05  # about the same share of the grid
    assert set(props.class_locations) == {1, 2}  # foreground classes only
    for k, locs in props.class_locations.items():
        assert all(seg[tuple(v)] == k for v in locs)


def test_preprocessing_fingerprint_changes_only_with_an_ignore_label():
    plan = build_plan()
    assert preprocessing_fingerprint(plan, "3d_fullres") == preprocessing_fingerprint(
        dataclasses.replace(plan, ignore_label=None), "3d_fullres"
    )
    assert preprocessing_fingerprint(plan, "3d_fullres") != preprocessing_fingerprint(
        dataclasses.replace(plan, ignore_label=3), "3d_fullres"
    )
