"""Label ids <-> class indices (gapped ids), dtypes, and foreground location sampling."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.preprocessing import classes_to_labels, label_dtype, labels_to_classes, sample_class_locations, seg_dtype
from medseg.preprocessing.labels import case_seed


def test_gapped_ids_map_to_contiguous_classes_and_back():
    ids = (0, 1, 2, 5, 117)
    label = np.array([[[0, 1, 2], [5, 117, 0]]], dtype=np.uint8)
    classes = labels_to_classes(label, ids)
    np.testing.assert_array_equal(classes, [[[0, 1, 2], [3, 4, 0]]])
    assert classes.dtype == np.int8
    back = classes_to_labels(classes, ids)
    np.testing.assert_array_equal(back, label)
    assert back.dtype == np.uint8


def test_float_labels_holding_integers_are_accepted():
    label = np.array([0.0, 2.0, 1.0], dtype=np.float32).reshape(1, 1, 3)
    np.testing.assert_array_equal(labels_to_classes(label, (0, 1, 2)).ravel(), [0, 2, 1])


def test_undeclared_and_non_integer_labels_are_refused_with_the_source_named():
    with pytest.raises(MedsegError, match=r"case_7.*\[3, 9\].*not declared"):
        labels_to_classes(np.array([[[0, 3, 9, 1]]]), (0, 1, 2), source="case_7")
    with pytest.raises(MedsegError, match=r"case_8.*\[-1\]"):
        labels_to_classes(np.array([[[0, -1]]]), (0, 1), source="case_8")
    with pytest.raises(MedsegError, match="non-integer"):
        labels_to_classes(np.array([[[0.0, 0.5]]]), (0, 1), source="x")


def test_dtypes_follow_number_of_classes_and_largest_id():
    assert seg_dtype(127) == np.int8 and seg_dtype(128) == np.int16
    assert label_dtype((0, 1, 255)) == np.uint8 and label_dtype((0, 256)) == np.uint16
    many = tuple(range(0, 300))
    classes = labels_to_classes(np.array([[[0, 299, 150]]]), many)
    assert classes.dtype == np.int16
    np.testing.assert_array_equal(classes_to_labels(classes, many).ravel(), [0, 299, 150])
    assert classes_to_labels(classes, many).dtype == np.uint16


def test_classes_out_of_range_are_refused():
    with pytest.raises(ValueError, match="0..2"):
        classes_to_labels(np.array([0, 3]), (0, 1, 2))


def test_class_locations_are_capped_correct_and_seeded():
    seg = np.zeros((30, 30, 30), dtype=np.int8)
    seg[:20, :20, :] = 1  # 12000 voxels -> capped
    seg[25, 25, 25:28] = 3  # 3 voxels -> all of them; class 2 absent
    locs = sample_class_locations(seg, 4, seed=case_seed("a"), max_per_class=10000)
    assert sorted(locs) == [1, 2, 3]
    assert len(locs[1]) == 10000 and len({tuple(c) for c in locs[1]}) == 10000
    assert all(seg[tuple(c)] == 1 for c in locs[1])
    assert locs[2] == []
    assert locs[3] == [[25, 25, 25], [25, 25, 26], [25, 25, 27]]
    assert sample_class_locations(seg, 4, seed=case_seed("a")) == locs
    assert sample_class_locations(seg, 4, seed=case_seed("b"))[1] != locs[1]
