"""load_dataset: MSD and nnU-Net v2 layouts, label mappings, dataset.json errors, the real datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.errors import DatasetError
from medseg.io.dataset import load_dataset
from medseg.io.validation import validate_dataset

from ._builders import edit_json, image_array, label_array, write, write_msd, write_nnunet

SHARED_DATA = Path(__file__).resolve().parents[4] / "shared" / "data"


def test_msd_layout_with_id_to_name_labels(msd):
    ds = load_dataset(msd)
    assert ds.name == "Tiny"
    assert ds.channel_names == ("MRI",) and ds.num_channels == 1
    assert ds.label_ids == (0, 1, 2)
    assert ds.label_names == ("background", "left", "right")
    assert ds.file_ending == ".nii.gz"
    assert [c.case_id for c in ds.cases] == ["case_000", "case_001", "case_002"]
    assert ds.cases[1].image_files == (msd / "imagesTr" / "case_001.nii.gz",)
    assert ds.cases[1].label_file == msd / "labelsTr" / "case_001.nii.gz"
    validate_dataset(ds, progress=False)


def test_name_to_id_labels_are_sorted_by_id_with_gaps(tmp_path):
    root = write_msd(tmp_path / "d", labels={"background": 0, "tumour": 5, "liver": 2})
    ds = load_dataset(root)
    assert ds.label_ids == (0, 2, 5)
    assert ds.label_names == ("background", "liver", "tumour")


def test_id_to_name_labels_with_gaps_are_sorted_numerically(tmp_path):
    root = write_msd(tmp_path / "d", labels={"117": "vessel", "0": "background", "5": "b", "10": "c"})
    ds = load_dataset(root)
    assert ds.label_ids == (0, 5, 10, 117)
    assert ds.label_names == ("background", "b", "c", "vessel")


def test_nnunet_v2_two_channels_discovered_from_folders(nnunet):
    ds = load_dataset(nnunet)
    assert ds.channel_names == ("T1", "FLAIR") and ds.num_channels == 2
    assert ds.label_ids == (0, 1, 2)
    assert [c.case_id for c in ds.cases] == ["pat0", "pat1", "pat2"]
    images = nnunet / "imagesTr"
    assert ds.cases[2].image_files == (images / "pat2_0000.nii.gz", images / "pat2_0001.nii.gz")
    assert ds.cases[2].label_file == nnunet / "labelsTr" / "pat2.nii.gz"
    validate_dataset(ds, progress=False)


def test_msd_training_list_resolves_to_channel_files(tmp_path):
    """An MSD training list naming CASE.nii.gz while the folder holds CASE_0000.nii.gz, CASE_0001.nii.gz."""
    root = write_nnunet(tmp_path / "d", n=2, channels=2)
    edit_json(
        root, training=[{"image": f"./imagesTr/pat{i}.nii.gz", "label": f"./labelsTr/pat{i}.nii.gz"} for i in (1, 0)]
    )
    ds = load_dataset(root)
    assert [c.case_id for c in ds.cases] == ["pat1", "pat0"]  # dataset.json order
    assert [p.name for p in ds.cases[0].image_files] == ["pat1_0000.nii.gz", "pat1_0001.nii.gz"]
    validate_dataset(ds, progress=False)


def test_single_channel_training_list_falls_back_to_0000_file(tmp_path):
    root = tmp_path / "d"
    write(root / "imagesTr" / "a_0000.nii.gz", image_array())
    write(root / "labelsTr" / "a.nii.gz", label_array())
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "modality": {"0": "CT"},
                "labels": {"0": "background", "1": "x", "2": "y"},
                "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
            }
        )
    )
    ds = load_dataset(root)
    assert ds.cases[0].image_files == (root / "imagesTr" / "a_0000.nii.gz",)
    validate_dataset(ds, progress=False)


def test_channel_names_take_precedence_over_modality(tmp_path):
    root = write_msd(tmp_path / "d")
    edit_json(root, modality={"0": "MRI"}, channel_names={"0": "T2"})
    assert load_dataset(root).channel_names == ("T2",)


@pytest.mark.parametrize("ending", [".nii", ".nrrd", ".mha"])
def test_other_file_formats(tmp_path, ending):
    root = write_nnunet(tmp_path / "d", n=2, channels=1, ending=ending)
    ds = load_dataset(root)
    assert ds.file_ending == ending
    assert ds.cases[0].image_files[0].name == f"pat0_0000{ending}"
    validate_dataset(ds, progress=False)


def test_msd_uncompressed_nifti_without_file_ending_key(tmp_path):
    ds = load_dataset(write_msd(tmp_path / "d", ending=".nii"))
    assert ds.file_ending == ".nii"
    validate_dataset(ds, progress=False)


@pytest.mark.parametrize(
    "labels, expected",
    [
        ({"background": 0, "whole tumour": [1, 2, 3]}, "region-based"),
        ({"0": "background", "1.5": "half"}, "'1.5'"),
        ({"background": 0, "half": 1.5}, "1.5"),
        ({"background": 0, "x": "one"}, "'x'"),
        ({"1": "a", "2": "b"}, "background"),
        ({"background": 0, "a": 1, "b": 1}, "more than once"),
        ({}, "'labels'"),
    ],
)
def test_bad_labels_in_dataset_json(tmp_path, labels, expected):
    root = write_msd(tmp_path / "d")
    edit_json(root, labels=labels)
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    assert expected in str(err.value)
    assert "dataset.json" in str(err.value)


def test_regions_class_order_with_single_ids_makes_singleton_regions(tmp_path):
    root = write_nnunet(tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    edit_json(root, regions_class_order=[int(v) for k, v in meta["labels"].items() if int(v) != 0])
    ds = load_dataset(root)
    assert ds.regions == tuple((i,) for i in ds.label_ids[1:])
    assert ds.regions_class_order == ds.label_ids[1:]


def test_missing_channel_names_and_bad_file_ending_reported_together(tmp_path):
    root = write_nnunet(tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    del meta["channel_names"]
    meta["file_ending"] = ".png"
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    assert len(err.value.problems) == 2
    assert "channel_names" in err.value.problems[0]
    assert "'.png'" in err.value.problems[1]


def test_missing_folder_missing_json_and_invalid_json(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError, match="dataset.json: not found"):
        load_dataset(tmp_path / "d")
    (tmp_path / "d" / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(tmp_path / "d")


def test_real_hippocampus_loads_and_validates():
    root = SHARED_DATA / "hippocampus"
    assert root.is_dir(), f"real data folder {root} is missing"
    ds = load_dataset(root)
    assert len(ds.cases) == 200
    assert len({c.case_id for c in ds.cases}) == 200
    assert ds.label_ids == (0, 1, 2)
    assert ds.label_names == ("background", "Anterior", "Posterior")
    assert ds.channel_names == ("MRI",)
    assert ds.cases[0].image_files == (root / "imagesTr" / "hippocampus_001.nii.gz",)
    validate_dataset(ds, num_workers=2, progress=False)  # float32 label files with exact 0/1/2 are valid


def test_real_totalseg_ct_loads_with_many_label_ids():
    root = SHARED_DATA / "totalseg_ct"
    assert root.is_dir(), f"real data folder {root} is missing"
    ds = load_dataset(root)
    assert ds.channel_names == ("CT",)
    assert ds.label_ids == tuple(range(118))
    assert ds.label_names[0] == "background" and ds.label_names[117] == "class_117"
    assert sorted(c.case_id for c in ds.cases) == ["example_ct", "example_ct_sm"]
    validate_dataset(ds, progress=False)  # present ids (0..117 with gaps) are all declared


def test_training_entries_naming_the_first_channel_file(tmp_path):
    root = write_nnunet(tmp_path / "d", n=2, channels=2)
    edit_json(
        root,
        training=[{"image": f"./imagesTr/pat{i}_0000.nii.gz", "label": f"./labelsTr/pat{i}.nii.gz"} for i in range(2)],
    )
    ds = load_dataset(root)
    assert [c.case_id for c in ds.cases] == ["pat0", "pat1"]
    assert [p.name for p in ds.cases[1].image_files] == ["pat1_0000.nii.gz", "pat1_0001.nii.gz"]
    validate_dataset(ds, progress=False)


def test_explicit_nnunet_dataset_mapping(tmp_path):
    root = write_nnunet(tmp_path / "d", n=2, channels=2)
    edit_json(
        root,
        dataset={
            "first": {
                "images": ["imagesTr/pat1_0000.nii.gz", "imagesTr/pat1_0001.nii.gz"],
                "label": "labelsTr/pat1.nii.gz",
            },
            "second": {"images": ["imagesTr/pat0_0000.nii.gz"], "label": "labelsTr/pat0.nii.gz"},
        },
    )
    ds = load_dataset(root)
    assert [c.case_id for c in ds.cases] == ["first", "second"]
    assert ds.cases[0].image_files[1] == root / "imagesTr" / "pat1_0001.nii.gz"
    with pytest.raises(DatasetError) as err:
        validate_dataset(ds, progress=False)
    assert err.value.problems == [
        "case second: imagesTr/pat0_0000.nii.gz: case has 1 image file(s) but dataset.json declares 2 channel(s)"
    ]
