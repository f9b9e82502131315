"""preprocess_dataset: files, resumability, crash leftovers, shared configurations, parallel = serial."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import medseg.preprocessing.storage as storage
from medseg.errors import DatasetError, MedsegError, PlanError
from medseg.io.image import read_channels, read_image
from medseg.planning.plan import NormalizationSpec
from medseg.preprocessing import (
    list_preprocessed_cases,
    load_case,
    preprocess_case,
    preprocess_dataset,
    preprocessed_folder,
)

from .conftest import FakeCase, FakeDataset, blob_case, build_plan, write_nifti


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def _count_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = storage.preprocess_case_arrays

    def counting(*args, **kwargs):
        calls.append(kwargs["case_id"])
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, "preprocess_case_arrays", counting)
    return calls


def test_cases_are_written_and_load_back_identically(tmp_path, tiny_dataset):
    ds = tiny_dataset(3, spacing=(2.0, 1.0, 1.0))
    plan = build_plan(spacing=(1.5, 1.0, 1.0), label_ids=(0, 1, 2))
    preprocess_dataset(ds, plan, tmp_path / "work")
    folder = preprocessed_folder(tmp_path / "work", plan, "3d_fullres")
    assert folder == tmp_path / "work" / "preprocessed" / "3d_fullres"
    assert list_preprocessed_cases(tmp_path / "work", plan, "3d_fullres") == ["case_000", "case_001", "case_002"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"case_00{i}.{e}" for i in range(3) for e in ("json", "npz")
    )
    case = ds.cases[1]
    image, geometry = read_channels(list(case.image_files))
    label, _ = read_image(case.label_file)
    data, seg, props = preprocess_case(image, geometry, label, plan, "3d_fullres", case_id="case_001")
    d2, s2, p2 = load_case(tmp_path / "work", plan, "3d_fullres", "case_001")
    np.testing.assert_array_equal(d2, data)
    np.testing.assert_array_equal(s2, seg)
    assert d2.dtype == np.float32 and s2.dtype == np.int8
    assert p2 == props  # including class locations and exact geometry


def test_second_run_skips_and_killed_run_is_redone(tmp_path, tiny_dataset, monkeypatch):
    ds = tiny_dataset(3)
    plan = build_plan(spacing=(2.0, 1.0, 1.0))
    work = tmp_path / "work"
    preprocess_dataset(ds, plan, work)
    folder = preprocessed_folder(work, plan, "3d_fullres")
    before = _mtimes(folder)

    calls = _count_calls(monkeypatch)
    preprocess_dataset(ds, plan, work)
    assert calls == [] and _mtimes(folder) == before

    # a run killed while writing case_001: its JSON never appeared, a temporary file and a truncated .npz remain
    (folder / "case_001.json").unlink()
    (folder / "case_001.npz").write_bytes(b"PK\x03\x04 truncated")
    (folder / ".tmp_k1l2e3d.npz").write_bytes(b"half written")
    assert list_preprocessed_cases(work, plan, "3d_fullres") == ["case_000", "case_002"]
    preprocess_dataset(ds, plan, work)
    assert calls == ["case_001"]
    assert not any(p.name.startswith(".tmp_") for p in folder.iterdir())
    after = _mtimes(folder)
    assert after["case_000.npz"] == before["case_000.npz"] and after["case_002.json"] == before["case_002.json"]
    data, seg, _ = load_case(work, plan, "3d_fullres", "case_001")
    assert data.shape[0] == 1 and seg is not None


def test_changed_plan_redoes_cases_and_stale_cache_is_refused(tmp_path, tiny_dataset, monkeypatch):
    ds = tiny_dataset(2)
    work = tmp_path / "work"
    old = build_plan(spacing=(2.0, 1.0, 1.0))
    preprocess_dataset(ds, old, work)
    new = build_plan(spacing=(2.0, 1.0, 1.0), norm=(NormalizationSpec("none"),))
    with pytest.raises(PlanError, match="re-run preprocessing"):
        load_case(work, new, "3d_fullres", "case_000")
    calls = _count_calls(monkeypatch)
    preprocess_dataset(ds, new, work)
    assert sorted(calls) == ["case_000", "case_001"]
    data, _, _ = load_case(work, new, "3d_fullres", "case_000")
    assert data.min() > 40  # raw intensities (about 100 to 150) now, no longer z-scores
    with pytest.raises(PlanError):
        load_case(work, old, "3d_fullres", "case_000")


def test_identical_configurations_are_computed_once(tmp_path, tiny_dataset, monkeypatch):
    ds = tiny_dataset(2)
    work = tmp_path / "work"
    plan = build_plan(
        configs=("3d_fullres", "2d", "3d_lowres"),
        spacings={"3d_fullres": (2.0, 1.0, 1.0), "2d": (2.0, 1.0, 1.0), "3d_lowres": (3.0, 2.0, 2.0)},
    )
    calls = _count_calls(monkeypatch)
    preprocess_dataset(ds, plan, work)
    assert sorted(calls) == ["case_000", "case_000", "case_001", "case_001"]  # fullres(=2d) and lowres
    full, flat = preprocessed_folder(work, plan, "3d_fullres"), preprocessed_folder(work, plan, "2d")
    assert full != flat
    for name in ("case_000.npz", "case_000.json"):
        assert os.path.samefile(full / name, flat / name)
    assert load_case(work, plan, "2d", "case_001")[0].shape == load_case(work, plan, "3d_fullres", "case_001")[0].shape
    assert (
        load_case(work, plan, "3d_lowres", "case_001")[0].shape[2] < load_case(work, plan, "2d", "case_001")[0].shape[2]
    )


def test_shared_data_identifier_gives_one_folder(tmp_path, tiny_dataset):
    ident = "spacing_2x1x1_zscore"
    plan = build_plan(
        configs=("3d_fullres", "2d"), spacing=(2.0, 1.0, 1.0), data_identifiers={"3d_fullres": ident, "2d": ident}
    )
    preprocess_dataset(tiny_dataset(1), plan, tmp_path / "work")
    assert [p.name for p in (tmp_path / "work" / "preprocessed").iterdir()] == [ident]

    clash = build_plan(
        configs=("3d_fullres", "3d_lowres"),
        spacings={"3d_fullres": (2.0, 1.0, 1.0), "3d_lowres": (4.0, 2.0, 2.0)},
        data_identifiers={"3d_fullres": "same", "3d_lowres": "same"},
    )
    with pytest.raises(PlanError, match="share the data_identifier"):
        preprocess_dataset(tiny_dataset(1), clash, tmp_path / "work2")


def test_parallel_equals_serial(tmp_path, tiny_dataset):
    ds = tiny_dataset(4)
    plan = build_plan(spacing=(1.7, 1.2, 0.9))
    preprocess_dataset(ds, plan, tmp_path / "a", num_workers=1)
    preprocess_dataset(ds, plan, tmp_path / "b", num_workers=2)
    for case in ds.cases:
        a = load_case(tmp_path / "a", plan, "3d_fullres", case.case_id)
        b = load_case(tmp_path / "b", plan, "3d_fullres", case.case_id)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert a[2] == b[2]


def test_bad_case_is_reported_and_the_others_are_written(tmp_path, tiny_dataset):
    ds = tiny_dataset(2)
    image, label = blob_case(seed=9)
    label[label == 2] = 9  # not declared
    root = ds.root
    bad = FakeCase(
        "case_bad",
        (write_nifti(root / "imagesTr" / "case_bad.nii.gz", image, (2.0, 1.0, 1.0)),),
        write_nifti(root / "labelsTr" / "case_bad.nii.gz", label.astype(np.uint8), (2.0, 1.0, 1.0)),
    )
    ds = FakeDataset(root, ds.cases + (bad,))
    plan = build_plan(spacing=(2.0, 1.0, 1.0))
    with pytest.raises(DatasetError, match=r"case_bad: case_bad: label values \[9\]") as err:
        preprocess_dataset(ds, plan, tmp_path / "work")
    assert len(err.value.problems) == 1
    assert list_preprocessed_cases(tmp_path / "work", plan, "3d_fullres") == ["case_000", "case_001"]


def test_missing_case_and_channel_mismatch_are_clear_errors(tmp_path, tiny_dataset):
    plan = build_plan()
    with pytest.raises(MedsegError, match="'nope' not found"):
        load_case(tmp_path, plan, "3d_fullres", "nope")
    two = build_plan(norm=(NormalizationSpec("zscore"), NormalizationSpec("none")))
    with pytest.raises(PlanError, match="1 channels but the plan expects 2"):
        preprocess_dataset(tiny_dataset(1), two, tmp_path / "work")
