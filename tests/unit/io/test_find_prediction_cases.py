"""find_prediction_cases: MSD and nnU-Net naming, channel checks, clear errors."""

from __future__ import annotations

import pytest

from medseg.errors import MedsegError
from medseg.io.dataset import find_prediction_cases

from ._builders import image_array, write


def make(folder, *names):
    for name in names:
        write(folder / name, image_array())
    return folder


def test_msd_naming_single_channel(tmp_path):
    folder = make(tmp_path / "in", "b.nii.gz", "a.nii.gz", "c.mha")
    cases = find_prediction_cases(folder, 1)
    assert [c.case_id for c in cases] == ["a", "b", "c"]
    assert cases[2].image_files == (folder / "c.mha",)
    assert all(c.label_file is None for c in cases)


def test_nnunet_naming_single_channel(tmp_path):
    folder = make(tmp_path / "in", "x_0000.nii.gz", "y_0000.nrrd")
    cases = find_prediction_cases(folder, 1)
    assert [(c.case_id, c.image_files) for c in cases] == [
        ("x", (folder / "x_0000.nii.gz",)),
        ("y", (folder / "y_0000.nrrd",)),
    ]


def test_nnunet_naming_two_channels_in_channel_order(tmp_path):
    folder = make(tmp_path / "in", "p2_0001.nii.gz", "p2_0000.nii.gz", "p1_0000.nii.gz", "p1_0001.nii.gz")
    cases = find_prediction_cases(folder, 2)
    assert [c.case_id for c in cases] == ["p1", "p2"]
    assert cases[1].image_files == (folder / "p2_0000.nii.gz", folder / "p2_0001.nii.gz")


def test_msd_case_ids_ending_in_four_digits(tmp_path):
    folder = make(tmp_path / "in", "scan_0007.nii.gz", "scan_0012.nii.gz")
    cases = find_prediction_cases(folder, 1)
    assert [c.case_id for c in cases] == ["scan_0007", "scan_0012"]


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    folder = make(tmp_path / "in", "a.nii.gz", ".tmp_abc.nii.gz")
    (folder / "notes.txt").write_text("hello")
    assert [c.case_id for c in find_prediction_cases(folder, 1)] == ["a"]


def test_missing_channel_names_the_case(tmp_path):
    folder = make(tmp_path / "in", "p1_0000.nii.gz", "p1_0001.nii.gz", "p2_0000.nii.gz")
    with pytest.raises(MedsegError) as err:
        find_prediction_cases(folder, 2)
    assert "case p2: missing channel file(s) p2_0001.nii.gz" in str(err.value)
    assert "p1" not in str(err.value).replace(str(folder), "")


def test_more_channels_than_the_model_expects(tmp_path):
    folder = make(tmp_path / "in", "p1_0000.nii.gz", "p1_0001.nii.gz")
    with pytest.raises(MedsegError, match=r"case p1: 2 channel files .* expects 1 channel"):
        find_prediction_cases(folder, 1)


def test_msd_naming_with_several_channels_is_refused(tmp_path):
    folder = make(tmp_path / "in", "a.nii.gz")
    with pytest.raises(MedsegError, match=r"case a: a.nii.gz has no channel suffix .* a_0000.nii.gz, a_0001.nii.gz"):
        find_prediction_cases(folder, 2)


def test_same_case_in_both_namings_is_refused(tmp_path):
    folder = make(tmp_path / "in", "a.nii.gz", "a_0000.nii.gz")
    with pytest.raises(MedsegError, match="case a: several files"):
        find_prediction_cases(folder, 1)


def test_every_problem_is_listed(tmp_path):
    folder = make(tmp_path / "in", "p1_0001.nii.gz", "p2_0000.nii.gz", "ok_0000.nii.gz", "ok_0001.nii.gz")
    with pytest.raises(MedsegError) as err:
        find_prediction_cases(folder, 2)
    assert len(err.value.problems) == 2
    assert "case p1: missing channel file(s) p1_0000.nii.gz" in err.value.problems[0]
    assert "case p2: missing channel file(s) p2_0001.nii.gz" in err.value.problems[1]


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(MedsegError, match="empty: no images found"):
        find_prediction_cases(tmp_path / "empty", 1)
    with pytest.raises(MedsegError, match="input folder not found"):
        find_prediction_cases(tmp_path / "nope", 1)
