"""Cross-validation splits: deterministic, complete, written once, user edits respected."""

from __future__ import annotations

import json

import pytest

from medseg.errors import ConfigError
from medseg.training.splits import fold_cases, load_or_create_splits, make_splits, read_splits

IDS = [f"case_{i:03d}" for i in range(23)]


def test_make_splits_partitions_cases_deterministically():
    folds = make_splits(IDS)
    assert len(folds) == 5
    vals = [c for f in folds for c in f["val"]]
    assert sorted(vals) == IDS  # every case held out exactly once
    assert sorted(len(f["val"]) for f in folds) == [4, 4, 5, 5, 5]
    for f in folds:
        assert set(f["train"]) | set(f["val"]) == set(IDS)
        assert not set(f["train"]) & set(f["val"])
    assert make_splits(list(reversed(IDS))) == folds  # input order does not matter
    assert make_splits(IDS, seed=1) != folds


def test_too_few_cases_suggests_fold_all():
    with pytest.raises(ConfigError, match="--fold all"):
        make_splits(["a", "b", "c"])


def test_file_written_once_and_edits_respected(tmp_path):
    folds = load_or_create_splits(tmp_path, IDS)
    path = tmp_path / "splits.json"
    assert json.loads(path.read_text()) == folds
    edited = [{"train": IDS[2:], "val": IDS[:2]}] + folds[1:]
    path.write_text(json.dumps(edited))
    assert load_or_create_splits(tmp_path, IDS) == edited
    train, val = fold_cases(tmp_path, IDS, 0)
    assert val == IDS[:2] and train == IDS[2:]
    assert fold_cases(tmp_path, IDS, "all") == (IDS, [])


def test_bad_split_files_are_refused(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="splits.json"):
        read_splits(path)
    path.write_text(json.dumps([{"train": ["a", "b"], "val": ["b"]}]))
    with pytest.raises(ConfigError, match="both train and val"):
        read_splits(path)
    path.write_text(json.dumps([{"train": ["a", "zzz"], "val": ["b"]}]))
    with pytest.raises(ConfigError, match="zzz"):
        read_splits(path, ["a", "b"])
    path.write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    with pytest.raises(ConfigError, match="fold 3 does not exist"):
        fold_cases(tmp_path, ["a", "b"], 3)
