"""The synthetic dataset generator: valid MSD data with the properties the pipeline must handle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io.dataset import load_dataset
from medseg.io.image import read_image
from medseg.io.synthetic import generate_synthetic_dataset
from medseg.io.validation import validate_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("syn") / "data", num_cases=6, seed=3)


def test_layout_and_dataset_json(synthetic):
    meta = json.loads((synthetic / "dataset.json").read_text())
    assert meta["modality"] == {"0": "MRI"}
    assert meta["labels"] == {"0": "background", "1": "large", "2": "medium", "3": "small"}
    assert meta["numTraining"] == 6 and len(meta["training"]) == 6
    ds = load_dataset(synthetic)
    assert ds.label_ids == (0, 1, 2, 3) and ds.channel_names == ("MRI",)
    assert [c.case_id for c in ds.cases] == [f"case_{i:03d}" for i in range(6)]
    validate_dataset(ds, progress=False)


def test_geometry_is_anisotropic_oblique_with_nonzero_origin(synthetic):
    shapes = set()
    for case in load_dataset(synthetic).cases:
        _, geo = read_image(case.image_files[0])
        _, lgeo = read_image(case.label_file)
        assert geo.matches(lgeo) == []
        assert geo.spacing == pytest.approx((3.0, 1.0, 1.2))
        d = np.asarray(geo.direction).reshape(3, 3)
        assert np.allclose(d @ d.T, np.eye(3), atol=1e-5)
        assert np.linalg.det(d) == pytest.approx(1.0, abs=1e-5)
        assert np.abs(d - np.eye(3)).max() > 0.1  # really oblique
        assert np.abs(geo.origin).max() > 1.0
        assert all(abs(s - n) <= 2 for s, n in zip(geo.shape, (20, 48, 40)))
        shapes.add(geo.shape)
    assert len(shapes) > 1  # shapes vary between cases


def test_structures_sizes_and_intensities(synthetic):
    counts = []
    for case in load_dataset(synthetic).cases:
        img, _ = read_image(case.image_files[0])
        lab, _ = read_image(case.label_file)
        n = [int((lab == k).sum()) for k in (1, 2, 3)]
        assert min(n) > 10, n  # every structure is present
        counts.append(n)
        body = img > 0
        assert (lab[~body] == 0).all()  # structures lie inside the body
        assert 0.15 < body.mean() < 0.8  # a zero background around a positive body
        means = [img[lab == k].mean() for k in (1, 2, 3)]
        assert means[0] < means[1] < means[2]
        assert img[lab == 1].std() > 5  # noise and bias field
    large, medium, small = np.mean(counts, axis=0)
    assert large > 3 * medium > 3 * small


def test_deterministic_per_seed(tmp_path):
    a = generate_synthetic_dataset(tmp_path / "a", num_cases=2, seed=7)
    b = generate_synthetic_dataset(tmp_path / "b", num_cases=2, seed=7)
    c = generate_synthetic_dataset(tmp_path / "c", num_cases=2, seed=8)
    for name in ("imagesTr/case_001.nii.gz", "labelsTr/case_001.nii.gz"):
        xa, ga = read_image(a / name)
        xb, gb = read_image(b / name)
        xc, gc = read_image(c / name)
        assert ga == gb and np.array_equal(xa, xb)
        assert ga != gc


def test_gapped_label_ids_keep_the_same_structures(tmp_path):
    a = generate_synthetic_dataset(tmp_path / "a", num_cases=2, seed=1)
    g = generate_synthetic_dataset(tmp_path / "g", num_cases=2, seed=1, label_ids=(0, 1, 2, 5))
    ds = load_dataset(g)
    assert ds.label_ids == (0, 1, 2, 5)
    assert ds.label_names == ("background", "large", "medium", "small")
    validate_dataset(ds, progress=False)
    la, _ = read_image(a / "labelsTr" / "case_000.nii.gz")
    lg, _ = read_image(g / "labelsTr" / "case_000.nii.gz")
    assert np.array_equal(np.where(la == 3, 5, la), lg)
    image_a, _ = read_image(a / "imagesTr" / "case_000.nii.gz")
    image_g, _ = read_image(g / "imagesTr" / "case_000.nii.gz")
    assert np.array_equal(image_a, image_g)


def test_overwrites_its_own_dataset_but_refuses_others(tmp_path):
    root = generate_synthetic_dataset(tmp_path / "d", num_cases=1)
    generate_synthetic_dataset(root, num_cases=2)
    assert len(load_dataset(root).cases) == 2
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "dataset.json").write_text(json.dumps({"name": "MyStudy"}))
    with pytest.raises(MedsegError, match="refusing to overwrite"):
        generate_synthetic_dataset(tmp_path / "user")
    assert json.loads((tmp_path / "user" / "dataset.json").read_text()) == {"name": "MyStudy"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"label_ids": (1, 2, 3, 4)},
        {"label_ids": (0, 1, 1, 2)},
        {"num_cases": 0},
        {"shape": (20, 48)},
        {"spacing": (0.0, 1.0, 1.0)},
    ],
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_synthetic_dataset(tmp_path / "d", **kwargs)


def test_regenerating_with_fewer_cases_removes_stale_cases(tmp_path):
    root = generate_synthetic_dataset(tmp_path / "d", num_cases=3)
    generate_synthetic_dataset(root, num_cases=2)
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]
