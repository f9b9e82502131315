"""validate_dataset: each problem is found, named by case and file, and all are reported at once."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from medseg.errors import DatasetError, MedsegError
from medseg.io.dataset import load_dataset
from medseg.io.validation import validate_dataset

from ._builders import DIRECTION, ORIGIN, SHAPE, SPACING_XYZ, edit_json, image_array, label_array, write, write_msd


def problems_of(root, num_workers: int = 1) -> list[str]:
    with pytest.raises(DatasetError) as err:
        validate_dataset(load_dataset(root), num_workers=num_workers, progress=False)
    assert isinstance(err.value, MedsegError)
    assert str(root) in str(err.value)  # the header names the dataset
    return err.value.problems


def only_problem(root) -> str:
    problems = problems_of(root)
    assert len(problems) == 1, problems
    return problems[0]


def test_image_label_shape_mismatch(msd):
    write(msd / "labelsTr" / "case_001.nii.gz", label_array(shape=(6, 9, 7)))
    msg = only_problem(msd)
    assert msg.startswith("case case_001: labelsTr/case_001.nii.gz:")
    assert "image/label shape mismatch" in msg and "[6, 9, 7]" in msg and "[6, 9, 8]" in msg


@pytest.mark.parametrize(
    "kwargs, what",
    [
        ({"spacing": (0.9, 1.1, 3.0)}, "spacing"),
        ({"origin": (10.0, -20.0, 9.0)}, "origin"),
        ({"direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)}, "direction"),
    ],
)
def test_geometry_mismatch_between_image_and_label(msd, kwargs, what):
    write(msd / "labelsTr" / "case_002.nii.gz", label_array(), **kwargs)
    msg = only_problem(msd)
    assert msg.startswith("case case_002: labelsTr/case_002.nii.gz:")
    assert "geometry mismatch between image" in msg and what in msg


def test_tiny_geometry_differences_are_tolerated(msd):
    origin = tuple(o + 1e-4 for o in ORIGIN)
    write(
        msd / "labelsTr" / "case_002.nii.gz",
        label_array(),
        origin=origin,
        spacing=tuple(s * (1 + 1e-5) for s in SPACING_XYZ),
    )
    validate_dataset(load_dataset(msd), progress=False)


def test_geometry_mismatch_between_channels(nnunet):
    write(nnunet / "imagesTr" / "pat1_0001.nii.gz", image_array(), spacing=(0.5, 1.1, 2.5))
    msg = only_problem(nnunet)
    assert msg.startswith("case pat1: imagesTr/pat1_0001.nii.gz:")
    assert "geometry mismatch between channel 1 and channel 0 (pat1_0000.nii.gz)" in msg and "spacing" in msg


def test_channel_shape_mismatch(nnunet):
    write(nnunet / "imagesTr" / "pat0_0001.nii.gz", image_array(shape=(6, 9, 9)))
    msg = only_problem(nnunet)
    assert msg.startswith("case pat0: imagesTr/pat0_0001.nii.gz:") and "shape [6, 9, 9] differs" in msg


def test_undeclared_label_values_are_listed(msd):
    lab = label_array()
    lab[0, 0, 0] = 7
    lab[0, 0, 1] = 4
    write(msd / "labelsTr" / "case_000.nii.gz", lab)
    msg = only_problem(msd)
    assert msg.startswith("case case_000: labelsTr/case_000.nii.gz:")
    assert "label values [4, 7] are not declared in dataset.json (declared: 0, 1, 2)" in msg


def test_non_integer_label_values(msd):
    lab = label_array().astype(np.float32)
    lab[2, 3, 3] = 1.5
    write(msd / "labelsTr" / "case_001.nii.gz", lab)
    msg = only_problem(msd)
    assert msg.startswith("case case_001: labelsTr/case_001.nii.gz:")
    assert "non-integer label values (e.g. 1.5; 1 voxels)" in msg


def test_float_label_file_with_integer_values_is_valid(msd):
    write(msd / "labelsTr" / "case_001.nii.gz", label_array().astype(np.float32))
    validate_dataset(load_dataset(msd), progress=False)


def test_nan_and_inf_in_image(msd):
    img = image_array()
    img[0, 0, :3] = np.nan
    img[1, 1, 1] = np.inf
    write(msd / "imagesTr" / "case_002.nii.gz", img)
    msg = only_problem(msd)
    assert msg.startswith("case case_002: imagesTr/case_002.nii.gz:")
    assert "3 NaN and 1 Inf" in msg


def test_unreadable_file(msd):
    (msd / "imagesTr" / "case_000.nii.gz").write_bytes(b"this is not an image")
    msg = only_problem(msd)
    assert msg.startswith("case case_000: imagesTr/case_000.nii.gz:") and "unreadable" in msg


def test_truncated_compressed_nifti(msd):
    path = msd / "labelsTr" / "case_001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = only_problem(msd)
    assert msg.startswith("case case_001: labelsTr/case_001.nii.gz:")
    assert "unreadable or truncated" in msg


def test_truncated_uncompressed_nifti(tmp_path):
    root = write_msd(tmp_path / "d", ending=".nii")
    path = root / "imagesTr" / "case_002.nii"
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    msg = only_problem(root)
    assert msg.startswith("case case_002: imagesTr/case_002.nii:")
    assert "truncated" in msg and f"ends after {len(data) - 40} bytes" in msg


def test_truncated_nifti_whose_gzip_stream_is_complete(msd):
    """A .nii.gz that is a complete gzip stream of a truncated NIfTI (e.g. a half-written file re-zipped)."""
    path = msd / "imagesTr" / "case_000.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 100]))
    msg = only_problem(msd)
    assert msg.startswith("case case_000: imagesTr/case_000.nii.gz:") and "header announces" in msg


def test_truncated_nrrd(tmp_path):
    from ._builders import write_nnunet

    root = write_nnunet(tmp_path / "d", channels=1, ending=".nrrd")
    path = root / "imagesTr" / "pat1_0000.nrrd"
    path.write_bytes(path.read_bytes()[:-50])
    msg = only_problem(root)
    assert msg.startswith("case pat1: imagesTr/pat1_0000.nrrd:") and "unreadable or truncated" in msg


def test_missing_channel_file(nnunet):
    (nnunet / "imagesTr" / "pat2_0001.nii.gz").unlink()
    msg = only_problem(nnunet)
    assert msg == "case pat2: imagesTr/pat2_0001.nii.gz: missing channel file (channel 1)"


def test_missing_label_file(msd):
    (msd / "labelsTr" / "case_001.nii.gz").unlink()
    assert only_problem(msd) == "case case_001: labelsTr/case_001.nii.gz: missing label file"


def test_missing_image_of_msd_case(msd):
    (msd / "imagesTr" / "case_000.nii.gz").unlink()
    assert only_problem(msd) == "case case_000: imagesTr/case_000.nii.gz: missing channel file (channel 0)"


def test_label_without_image_in_discovered_layout(nnunet):
    write(nnunet / "labelsTr" / "pat9.nii.gz", label_array())
    problems = problems_of(nnunet)
    assert problems == [
        "case pat9: imagesTr/pat9_0000.nii.gz: missing channel file (channel 0)",
        "case pat9: imagesTr/pat9_0001.nii.gz: missing channel file (channel 1)",
    ]


def test_image_without_label_in_discovered_layout(nnunet):
    write(nnunet / "imagesTr" / "pat7_0000.nii.gz", image_array())
    write(nnunet / "imagesTr" / "pat7_0001.nii.gz", image_array())
    assert only_problem(nnunet) == "case pat7: labelsTr/pat7.nii.gz: missing label file"


def test_msd_4d_multichannel_file_gets_a_split_hint(tmp_path):
    root = write_msd(tmp_path / "d", n=2)
    edit_json(root, modality={"0": "FLAIR", "1": "T1"})
    write(root / "imagesTr" / "case_000.nii.gz", np.stack([image_array(0), image_array(1)]))
    write(root / "imagesTr" / "case_001.nii.gz", np.stack([image_array(0), image_array(1)]))
    problems = problems_of(root)
    assert len(problems) == 4  # two channel files per case
    assert problems[0].startswith("case case_000: imagesTr/case_000_0000.nii.gz: missing channel file")
    assert "case_000.nii.gz, which looks like one multi-channel file" in problems[0]
    assert "case_000_0000.nii.gz, case_000_0001.nii.gz" in problems[0]


def test_4d_image_is_wrong_dimensionality(msd):
    write(msd / "imagesTr" / "case_001.nii.gz", np.stack([image_array(0), image_array(1)]))
    msg = only_problem(msd)
    assert msg.startswith("case case_001: imagesTr/case_001.nii.gz: wrong dimensionality: 4D image")


def test_channels_with_different_dimensionality(nnunet):
    write(nnunet / "imagesTr" / "pat0_0001.nii.gz", image_array()[0])
    msg = only_problem(nnunet)
    assert msg.startswith("case pat0: imagesTr/pat0_0001.nii.gz:") and "channel 1 is 2D but channel 0" in msg


def test_dataset_mixing_2d_and_3d_cases(msd):
    write(msd / "imagesTr" / "case_002.nii.gz", image_array()[0])
    write(msd / "labelsTr" / "case_002.nii.gz", label_array()[2])
    msg = only_problem(msd)
    assert "mixes 2D and 3D" in msg and "case_002" in msg


def test_vector_image_is_rejected(msd):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.zeros(SHAPE + (3,), dtype=np.uint8), isVector=True)
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    sitk.WriteImage(img, str(msd / "imagesTr" / "case_000.nii.gz"))
    msg = only_problem(msd)
    assert msg.startswith("case case_000: imagesTr/case_000.nii.gz:") and "3 components per voxel" in msg


def test_extra_channel_file_beyond_declared_channels(nnunet):
    write(nnunet / "imagesTr" / "pat1_0002.nii.gz", image_array())
    msg = only_problem(nnunet)
    assert msg.startswith("case pat1: imagesTr/pat1_0002.nii.gz: channel file 2 but dataset.json declares 2 channel(s)")


def test_duplicate_case_ids(msd):
    meta = json.loads((msd / "dataset.json").read_text())
    edit_json(msd, training=meta["training"] + [meta["training"][1]])
    assert only_problem(msd) == "case case_001: duplicate case id, listed 2 times in dataset.json"


def test_empty_dataset(tmp_path):
    root = write_msd(tmp_path / "d", n=0)
    msg = only_problem(root)
    assert "no training cases found" in msg


def test_empty_discovered_dataset(nnunet):
    for p in list((nnunet / "imagesTr").iterdir()) + list((nnunet / "labelsTr").iterdir()):
        p.unlink()
    assert "no training cases found" in only_problem(nnunet)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_every_problem_is_reported_at_once(tmp_path, num_workers):
    root = write_msd(tmp_path / "d", n=6)
    (root / "labelsTr" / "case_000.nii.gz").unlink()
    write(root / "labelsTr" / "case_001.nii.gz", label_array(shape=(5, 9, 8)))
    lab = label_array()
    lab[0, 0, 0] = 9
    write(root / "labelsTr" / "case_003.nii.gz", lab)
    img = image_array()
    img[0, 0, 0] = np.nan
    write(root / "imagesTr" / "case_004.nii.gz", img)
    (root / "imagesTr" / "case_005.nii.gz").write_bytes(b"\x00" * 10)
    problems = problems_of(root, num_workers=num_workers)
    assert len(problems) == 5, problems
    expected = [
        ("case case_000: labelsTr/case_000.nii.gz", "missing label file"),
        ("case case_001: labelsTr/case_001.nii.gz", "shape mismatch"),
        ("case case_003: labelsTr/case_003.nii.gz", "[9]"),
        ("case case_004: imagesTr/case_004.nii.gz", "NaN"),
        ("case case_005: imagesTr/case_005.nii.gz", "unreadable"),
    ]
    for msg, (where, what) in zip(problems, expected):
        assert msg.startswith(where) and what in msg, msg


def test_nan_in_nrrd_image(tmp_path):
    from ._builders import write_nnunet

    root = write_nnunet(tmp_path / "d", channels=1, ending=".nrrd")
    img = image_array()
    img[2, 2, 2] = np.nan
    write(root / "imagesTr" / "pat0_0000.nrrd", img)
    msg = only_problem(root)
    assert msg == "case pat0: imagesTr/pat0_0000.nrrd: image contains 1 NaN and 0 Inf voxel(s)"


def test_nan_in_float_label_file(msd):
    lab = label_array().astype(np.float32)
    lab[0, 0, 0] = np.nan
    write(msd / "labelsTr" / "case_002.nii.gz", lab)
    msg = only_problem(msd)
    assert msg.startswith("case case_002: labelsTr/case_002.nii.gz: label map contains 1 NaN")
