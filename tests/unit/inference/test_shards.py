"""Splitting a folder's cases among processes: the size-balanced assignment, ``--part K/N``, the part files of the
folder records and their merge, and predict_folder's shards adding up to one run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.errors import ConfigError
from medseg.inference import predict_folder
from medseg.inference.prediction_record import RECORD_NAME, merge_record_parts
from medseg.inference.shards import Shard, assign_shards, case_voxels, merge_parts, part_paths, select_shard
from medseg.io.dataset import Case

from .conftest import bright_box_image, threshold_predictor, write_oblique


def test_assignment_covers_every_case_once_balanced_and_deterministic():
    rng = random.Random(3)
    sizes = {f"case_{i:03d}": rng.randint(1, 10_000) for i in range(57)}
    for count in (1, 2, 3, 7):
        shards = assign_shards(sizes, count)
        assert len(shards) == count
        flat = [c for s in shards for c in s]
        assert sorted(flat) == sorted(sizes)  # every case, exactly once
        loads = [sum(sizes[c] for c in s) for s in shards]
        assert max(loads) - min(loads) <= max(sizes.values())  # greedy: within one case of each other
        shuffled = dict(sorted(sizes.items(), key=lambda _: rng.random()))
        assert assign_shards(shuffled, count) == shards  # the listing order does not matter


def test_assignment_puts_the_largest_cases_apart_and_leaves_shards_empty_beyond_the_cases():
    sizes = {"a": 100, "b": 90, "c": 10, "d": 10}
    assert assign_shards(sizes, 2) == [["a", "d"], ["b", "c"]]
    shards = assign_shards({"x": 5, "y": 5}, 4)
    assert shards == [["x"], ["y"], [], []]
    assert assign_shards({}, 3) == [[], [], []]


def test_part_parses_one_based_and_refuses_the_rest():
    shard = Shard.parse("2/4")
    assert (shard.index, shard.count, shard.label) == (1, 4, "part 2 of 4")
    assert shard.part_path(Path("out/prediction_record.json")) == Path("out/prediction_record.part-2-of-4.json")
    for bad in ("0/4", "5/4", "1/0", "2", "a/b", "-1/3"):
        with pytest.raises(ConfigError, match="K/N"):
            Shard.parse(bad)


def test_case_voxels_reads_headers_and_counts_channels(tmp_path):
    a, b = tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"
    write_oblique(a, np.zeros((4, 5, 6), np.float32))
    write_oblique(b, np.zeros((4, 5, 6), np.float32))
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    assert case_voxels([a]) == 120 and case_voxels([a, b]) == 240
    assert case_voxels([tmp_path / "broken.nii.gz"]) == 0


def test_select_shard_splits_by_size(tmp_path):
    cases = []
    for i, z in enumerate((40, 30, 20, 10, 10)):
        f = tmp_path / f"c{i}.nii.gz"
        write_oblique(f, np.zeros((z, 4, 4), np.float32))
        cases.append(Case(f"c{i}", (f,), None))
    first, second = (select_shard(cases, Shard(k, 2)) for k in (0, 1))
    assert [c.case_id for c in first] == ["c0", "c3", "c4"] and [c.case_id for c in second] == ["c1", "c2"]


def test_merge_parts_unions_cases_and_removes_the_parts(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": "f", "cases": {"a": 1, "b": 1}}))
    (tmp_path / "table.part-1-of-2.json").write_text(json.dumps({"format": "f", "cases": {"b": 2, "c": 2}}))
    (tmp_path / "table.part-2-of-2.json").write_text("{broken")
    (tmp_path / "table.part-x.json").write_text("{}")  # not a part: left alone
    assert [p.name for p in part_paths(path)] == ["table.part-1-of-2.json", "table.part-2-of-2.json"]
    assert merge_parts(path, lambda head, cases: {"format": head["format"], "n": len(cases), "cases": cases})
    assert json.loads(path.read_text()) == {"format": "f", "n": 3, "cases": {"a": 1, "b": 2, "c": 2}}
    assert part_paths(path) == [] and (tmp_path / "table.part-x.json").exists()
    assert not merge_parts(path, lambda head, cases: {})  # nothing left to merge


@pytest.fixture
def input_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    for i, z in enumerate((12, 10, 10, 14, 10)):
        image, _ = bright_box_image(shape=(z, 24, 20), seed=i)
        write_oblique(folder / f"case_{i}.nii.gz", image, origin=(1.0 * i, -2.0, 3.5))
    for ch in range(2):  # malformed: a second channel for a one-channel model
        write_oblique(folder / f"case_9_{ch:04d}.nii.gz", np.ones((4, 4, 4), np.float32))
    return folder


def test_parts_add_up_to_one_run_and_a_plain_run_merges_their_records(input_dir, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    one = predict_folder(input_dir, whole, threshold_predictor(), progress=False)
    parts = [
        predict_folder(input_dir, split, threshold_predictor(), progress=False, shard=Shard(k, 3)) for k in range(3)
    ]
    written = [c for p in parts for c in p.written]
    assert sorted(written) == sorted(one.written) == [f"case_{i}" for i in range(5)]
    assert "case_9" in one.failed and "case_9" in parts[0].failed  # reported once, by the first part
    assert not parts[1].failed and not parts[2].failed and "(part 2 of 3)" in parts[1].summary()
    for case in one.written:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(whole / f"{case}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(split / f"{case}.nii.gz")))
        np.testing.assert_array_equal(a, b)
    assert not (split / RECORD_NAME).exists()
    part_records = [json.loads(p.read_text())["cases"] for p in part_paths(split / RECORD_NAME)]
    assert sorted(len(r) for r in part_records) == sorted(len(p.written) for p in parts)

    again = predict_folder(input_dir, split, threshold_predictor(), progress=False, shard=Shard(1, 3))
    assert not again.written and sorted(again.skipped) == sorted(parts[1].written)  # resumable

    plain = predict_folder(input_dir, split, threshold_predictor(), progress=False)
    assert not plain.written and len(plain.skipped) == 5
    assert part_paths(split / RECORD_NAME) == []
    record = json.loads((split / RECORD_NAME).read_text())
    assert sorted(record["cases"]) == sorted(one.written) and record["summary"]["cases"] == 5


def test_merge_record_parts_recomputes_the_summary(tmp_path):
    path = tmp_path / RECORD_NAME
    head = {"time_budget_per_case": 2.0, "rule": "given", "reduction_order": [], "summary": {}}
    for k, (case, seconds, held) in enumerate((("a", 1.0, True), ("b", 3.0, False))):
        entry = {"seconds": seconds, "held": held, "reduced": not held}
        Shard(k, 2).part_path(path).write_text(json.dumps({**head, "cases": {case: entry}}))
    assert merge_record_parts(path)
    record = json.loads(path.read_text())
    assert record["summary"] == {"cases": 2, "mean_seconds": 2.0, "held": 1, "reduced": 1}
    assert record["time_budget_per_case"] == 2.0 and list(record["cases"]) == ["a", "b"]
