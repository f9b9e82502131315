"""Fingerprint values on a hand-built tiny dataset, sampling, JSON round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.fingerprint import Fingerprint, class_statistics, extract_fingerprint, nonzero_bbox
from medseg.io.dataset import Case, DatasetInfo


def _write(array: np.ndarray, spacing_xyz: tuple[float, ...], path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing_xyz)
    img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # oblique/permuted: must not matter
    sitk.WriteImage(img, str(path))


def make_case(root: Path, case_id: str, fill: float) -> tuple[Case, np.ndarray, np.ndarray]:
    """(6, 8, 10) image with a zero frame; nonzero box (4, 5, 6); class 1 in two blobs, class 5 one blob."""
    img = np.zeros((6, 8, 10), np.float32)
    img[1:5, 2:7, 3:9] = fill
    lab = np.zeros((6, 8, 10), np.uint8)
    lab[1:3, 2:4, 3:5] = 1  # 8 voxels
    lab[4, 6, 8] = 1  # 1 voxel, separate component
    lab[3, 5, 5:8] = 5  # 3 voxels
    img[lab == 1] = np.arange(1, 10, dtype=np.float32) + fill  # known foreground intensities
    img[lab == 5] = 100.0 + fill
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    ip, lp = root / "imagesTr" / f"{case_id}.nii.gz", root / "labelsTr" / f"{case_id}.nii.gz"
    _write(img, (0.8, 0.9, 3.0), ip)  # SimpleITK (x, y, z) order
    _write(lab, (0.8, 0.9, 3.0), lp)
    return Case(case_id=case_id, image_files=(ip,), label_file=lp), img, lab


@pytest.fixture
def tiny(tmp_path):
    cases, imgs, labs = [], [], []
    for i, fill in enumerate((10.0, 20.0, 30.0)):
        c, im, lb = make_case(tmp_path, f"case_{i}", fill)
        cases.append(c)
        imgs.append(im)
        labs.append(lb)
    ds = DatasetInfo(
        root=tmp_path,
        name="tiny",
        channel_names=("MRI",),
        label_ids=(0, 1, 5),
        label_names=("background", "a", "b"),
        cases=tuple(cases),
        file_ending=".nii.gz",
    )
    return ds, imgs, labs


def test_per_case_values(tiny):
    ds, _, _ = tiny
    fp = extract_fingerprint(ds, progress=False)
    assert fp.num_cases == 3 and fp.dataset_name == "tiny" and fp.label_ids == (0, 1, 5)
    c = fp.cases[0]
    assert c.case_id == "case_0"
    assert c.spacing == pytest.approx((3.0, 0.9, 0.8))  # (Z, Y, X)
    assert c.shape == (6, 8, 10)
    assert c.shape_after_crop == (4, 5, 6)
    assert c.relative_size_after_crop == pytest.approx(120 / 480)
    assert c.class_voxel_counts == {1: 9, 5: 3}
    assert c.class_component_sizes == {1: (8, 1), 5: (3,)}
    # centres of mass in voxel indices of the stored (Z, Y, X) array, not cropped, not in mm
    assert c.class_centroids[1] == pytest.approx((16 / 9, 26 / 9, 4.0))
    assert c.class_centroids[5] == pytest.approx((3.0, 5.0, 6.0))
    assert fp.median_spacing() == pytest.approx((3.0, 0.9, 0.8))
    assert fp.median_relative_size_after_crop() == pytest.approx(0.25)


def test_foreground_intensity_statistics(tiny):
    ds, imgs, labs = tiny
    fp = extract_fingerprint(ds, progress=False)
    fg = np.concatenate([im[lb > 0] for im, lb in zip(imgs, labs)]).astype(np.float64)
    (st,) = fp.intensity
    assert st.num_samples == fg.size == 36
    assert st.mean == pytest.approx(fg.mean())
    assert st.std == pytest.approx(fg.std())
    assert st.median == pytest.approx(np.median(fg))
    assert (st.min, st.max) == (pytest.approx(fg.min()), pytest.approx(fg.max()))
    assert st.percentile_00_5 == pytest.approx(np.percentile(fg, 0.5))
    assert st.percentile_99_5 == pytest.approx(np.percentile(fg, 99.5))


def test_sampling_is_capped_seeded_and_independent_of_workers(tiny):
    ds, _, _ = tiny
    a = extract_fingerprint(ds, samples_per_case=5, progress=False)
    b = extract_fingerprint(ds, samples_per_case=5, num_workers=2, progress=False)
    assert a.intensity[0].num_samples == 15
    assert a == b
    c = extract_fingerprint(ds, samples_per_case=5, seed=7, progress=False)
    assert c.intensity[0].num_samples == 15


def test_json_round_trip_and_atomic_save(tiny, tmp_path):
    ds, _, _ = tiny
    fp = extract_fingerprint(ds, progress=False)
    out = tmp_path / "work" / "fingerprint.json"
    fp.save(out)
    assert Fingerprint.load(out) == fp
    assert Fingerprint.from_json(fp.to_json()).to_json() == fp.to_json()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp")]


def test_no_foreground_gives_null_statistics_in_json(tmp_path):
    img = np.ones((4, 4, 4), np.float32)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    _write(img, (1.0, 1.0, 1.0), tmp_path / "imagesTr" / "a.nii.gz")
    _write(np.zeros((4, 4, 4), np.uint8), (1.0, 1.0, 1.0), tmp_path / "labelsTr" / "a.nii.gz")
    case = Case("a", (tmp_path / "imagesTr" / "a.nii.gz",), tmp_path / "labelsTr" / "a.nii.gz")
    ds = DatasetInfo(tmp_path, "empty", ("CT",), (0, 1), ("bg", "x"), (case,), ".nii.gz")
    fp = extract_fingerprint(ds, progress=False)
    assert fp.intensity[0].num_samples == 0
    assert '"mean": null' in fp.to_json()
    back = Fingerprint.from_json(fp.to_json())
    assert np.isnan(back.intensity[0].mean)


def test_unreadable_file_names_the_file(tiny, tmp_path):
    ds, _, _ = tiny
    bad = ds.cases[1].image_files[0]
    bad.write_bytes(b"not an image")
    with pytest.raises(MedsegError, match="case_1.nii.gz"):
        extract_fingerprint(ds, progress=False)


def test_load_errors(tmp_path):
    with pytest.raises(MedsegError, match="not found"):
        Fingerprint.load(tmp_path / "missing.json")
    (tmp_path / "f.json").write_text('{"schema_version": 99}')
    with pytest.raises(MedsegError, match="schema_version"):
        Fingerprint.load(tmp_path / "f.json")


def test_class_centroids_match_scipy_on_gapped_ids():
    rng = np.random.default_rng(0)
    lab = rng.choice([0, 0, 0, 3, 70000], size=(7, 9, 11)).astype(np.int64)  # an id too large for find_objects
    lab[lab == 3] = np.where(rng.random((lab == 3).sum()) < 0.5, 3, 117)
    ids = [3, 117, 70000]
    got = class_statistics(lab)[2]
    assert sorted(got) == ids
    want = ndimage.center_of_mass(np.ones(lab.shape), lab, ids)
    for i, w in zip(ids, want):
        assert got[i] == pytest.approx(w)
    assert class_statistics(lab.astype(np.float32))[2][3] == pytest.approx(want[0])  # float label files
    small = np.where(lab == 70000, 0, lab)  # ids that fit find_objects: centres from the bounding boxes
    got_small = class_statistics(small)[2]
    assert sorted(got_small) == [3, 117]
    for i, w in zip(ids, want):
        if i in got_small:
            assert got_small[i] == pytest.approx(w)
    assert class_statistics(np.zeros((3, 4, 5), np.uint8))[2] == {}


def test_class_statistics_with_gapped_ids():
    lab = np.zeros((5, 5, 5), np.uint8)
    lab[0, 0, 0] = 117
    lab[4, 4, 4] = 117
    lab[2, 1:4, 2] = 2
    counts, comps, centroids = class_statistics(lab)
    assert counts == {2: 3, 117: 2}
    assert comps == {2: (3,), 117: (1, 1)}
    assert centroids == {2: (2.0, 2.0, 2.0), 117: (2.0, 2.0, 2.0)}


def test_nonzero_bbox():
    img = np.zeros((2, 5, 6, 7), np.float32)
    img[1, 1:3, 2, 4:6] = -3.0  # negative values are nonzero too
    assert nonzero_bbox(img) == (slice(1, 3), slice(2, 3), slice(4, 6))
    assert nonzero_bbox(np.zeros((1, 3, 3, 3))) == (slice(0, 3),) * 3
