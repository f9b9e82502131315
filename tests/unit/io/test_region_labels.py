"""Region-based labels in dataset.json (nnU-Net v2): parsing, and errors naming the dataset.json key."""

from __future__ import annotations

import pytest

from medseg.errors import DatasetError
from medseg.io.dataset import load_dataset
from medseg.io.validation import validate_dataset

from ._builders import edit_json, write_msd

BRATS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}


def _dataset(tmp_path, labels, **extra):
    root = write_msd(tmp_path / "ds", n=2)
    edit_json(root, labels=labels, **extra)
    return root


def test_regions_are_parsed_in_dataset_json_order(tmp_path):
    ds = load_dataset(_dataset(tmp_path, BRATS, regions_class_order=[1, 2, 3]))
    assert ds.regions == ((1, 2, 3), (2, 3), (3,))
    assert ds.regions_class_order == (1, 2, 3)
    assert ds.label_ids == (0, 1, 2, 3)
    assert ds.label_names == ("background", "label_1", "label_2", "enhancing")
    assert ds.ignore_label is None


def test_region_dataset_with_ignore_label(tmp_path):
    ds = load_dataset(
        _dataset(tmp_path, {"background": 0, "all": [1, 2], "inner": 2, "ignore": 3}, regions_class_order=[1, 2])
    )
    assert ds.regions == ((1, 2), (2,)) and ds.ignore_label == 3 and ds.label_ids == (0, 1, 2)


def test_region_dataset_label_files_validate(tmp_path):
    # the builder's label maps hold ids 0, 1, 2
    ds = load_dataset(_dataset(tmp_path, {"background": 0, "both": [1, 2], "right": 2}, regions_class_order=[1, 2]))
    validate_dataset(ds, progress=False)


@pytest.mark.parametrize(
    "labels, extra, expected",
    [
        (BRATS, {}, "'regions_class_order' is missing"),
        (BRATS, {"regions_class_order": [1, 2]}, "'regions_class_order' has 2 entries but 'labels' declares 3"),
        (BRATS, {"regions_class_order": [1, 2, 3, 3]}, "'regions_class_order' has 4 entries"),
        (
            {"background": 0, "whole": [1, 2, 3], "ignore": 3},
            {"regions_class_order": [1]},
            "region 'whole' [1, 2, 3] contains the ignore label id 3",
        ),
        (BRATS, {"regions_class_order": [1, 2, 7]}, "'regions_class_order' holds id(s) [7]"),
        (BRATS, {"regions_class_order": "123"}, "'regions_class_order' must be a list"),
        ({"whole": [1, 2], "core": 2}, {"regions_class_order": [1, 2]}, "no background label"),
        ({"background": 0, "whole": [0, 1]}, {"regions_class_order": [1]}, "contains the background id 0"),
        ({"background": 0, "whole": ["a"]}, {"regions_class_order": [1]}, "'labels': region 'whole'"),
    ],
)
def test_region_errors_name_the_key(tmp_path, labels, extra, expected):
    with pytest.raises(DatasetError) as err:
        load_dataset(_dataset(tmp_path, labels, **extra))
    assert expected in str(err.value)
    assert "dataset.json" in str(err.value)
