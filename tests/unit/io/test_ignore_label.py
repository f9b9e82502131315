"""dataset.json ignore labels (nnU-Net v2 partial annotation): accepted as the highest id, kept out of the classes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import DatasetError
from medseg.io.dataset import load_dataset
from medseg.io.validation import validate_dataset

from ._builders import label_array, write, write_msd


def _with_labels(tmp_path, labels, n=2):
    return write_msd(tmp_path / "ds", n=n, labels=labels)


@pytest.mark.parametrize(
    "labels",
    [
        {"0": "background", "1": "left", "2": "right", "3": "ignore"},  # MSD id -> name
        {"background": 0, "left": 1, "right": 2, "Ignore": 3},  # nnU-Net v2 name -> id, any case
    ],
)
def test_ignore_label_is_kept_out_of_the_classes(tmp_path, labels):
    ds = load_dataset(_with_labels(tmp_path, labels))
    assert ds.label_ids == (0, 1, 2)
    assert ds.label_names == ("background", "left", "right")
    assert ds.ignore_label == 3
    assert ds.declared_label_ids == (0, 1, 2, 3)


def test_without_ignore_label_nothing_changes(tmp_path):
    ds = load_dataset(_with_labels(tmp_path, {"0": "background", "1": "left", "2": "right"}))
    assert ds.ignore_label is None and ds.declared_label_ids == ds.label_ids == (0, 1, 2)


def test_ignore_not_the_highest_id_names_the_labels_key(tmp_path):
    root = _with_labels(tmp_path, {"0": "background", "1": "ignore", "2": "right"})
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    msg = str(err.value)
    assert "dataset.json" in msg and "'labels'" in msg
    assert "ignore must be the highest label id" in msg and "id 1" in msg and "e.g. 3" in msg


def test_two_ignore_labels_are_refused(tmp_path):
    root = _with_labels(tmp_path, {"background": 0, "left": 1, "ignore": 2, "IGNORE": 3})
    with pytest.raises(DatasetError, match="at most one is allowed"):
        load_dataset(root)


def test_ignore_in_a_region_list_is_refused(tmp_path):
    root = _with_labels(tmp_path, {"background": 0, "tumour": [1, 2, 3], "ignore": 3})
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "regions_class_order": [1]}))
    with pytest.raises(DatasetError, match="'tumour'.*contains the ignore label id 3"):
        load_dataset(root)


def test_validation_accepts_ignore_voxels_and_still_rejects_undeclared_ids(tmp_path):
    root = _with_labels(tmp_path, {"0": "background", "1": "left", "2": "right", "5": "ignore"})
    lab = label_array()
    lab[0] = 5
    write(root / "labelsTr" / "case_000.nii.gz", lab)
    validate_dataset(load_dataset(root), progress=False)  # no error: 5 is the ignore label
    lab[0, 0, 0] = 4
    write(root / "labelsTr" / "case_001.nii.gz", lab)
    with pytest.raises(DatasetError, match=r"label values \[4\] are not declared"):
        validate_dataset(load_dataset(root), progress=False)


def test_fingerprint_counts_ignore_voxels_as_unlabelled(tmp_path):
    from medseg.fingerprint import extract_fingerprint

    root = _with_labels(tmp_path, {"0": "background", "1": "left", "2": "right", "3": "ignore"}, n=1)
    lab = label_array()
    lab[4] = 3  # a whole slice unannotated, half of label 2's voxels among them
    write(root / "labelsTr" / "case_000.nii.gz", lab)
    ds = load_dataset(root)
    fp = extract_fingerprint(ds, progress=False)
    case = fp.cases[0]
    assert set(case.class_voxel_counts) == {1, 2}
    assert case.class_voxel_counts == {1: int((lab == 1).sum()), 2: int((lab == 2).sum())}
    assert sum(case.class_component_sizes[2]) == int((lab == 2).sum())
    assert fp.intensity[0].num_samples == int(((lab == 1) | (lab == 2)).sum())  # foreground only
    assert fp.label_ids == (0, 1, 2) and fp.ignore_label == 3
    d = json.loads(fp.to_json())
    assert d["ignore_label"] == 3
    del d["ignore_label"]  # a fingerprint written before ignore labels
    assert type(fp).from_dict(d).ignore_label is None
    assert np.isfinite(fp.intensity[0].mean)
