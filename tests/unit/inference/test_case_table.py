"""CaseTable: a per-folder table kept case by case, extended by reruns, split into shard parts and merged."""

from __future__ import annotations

import json

import pytest

from medseg.errors import MedsegError
from medseg.inference.case_table import CaseTable
from medseg.inference.shards import Shard


def _derived(out):
    return lambda cases: [(out / "table.csv", ",".join(cases) + "\n")]


def test_rerun_extends_the_table_and_rewrites_the_derived_file(tmp_path):
    table = CaseTable(tmp_path / "table.json", "t-v1", "test table", derived=_derived(tmp_path))
    table.record({"b": {"x": 2}})
    table.record({"a": {"x": 1}})
    document = json.loads((tmp_path / "table.json").read_text())
    assert document == {"format": "t-v1", "cases": {"a": {"x": 1}, "b": {"x": 2}}}
    assert (tmp_path / "table.csv").read_text() == "a,b\n"
    again = CaseTable(tmp_path / "table.json", "t-v1", "test table", derived=_derived(tmp_path))
    assert set(again.cases) == {"a", "b"}
    again.record({"c": {"x": 3}})
    assert list(json.loads((tmp_path / "table.json").read_text())["cases"]) == ["a", "b", "c"]


def test_an_unusable_earlier_file_is_replaced(tmp_path, caplog):
    (tmp_path / "table.json").write_text('{"format": "other", "cases": {"a": {}}}')
    table = CaseTable(tmp_path / "table.json", "t-v1", "test table")
    assert table.cases == {} and "not a t-v1 document" in caplog.text
    (tmp_path / "table.json").write_text("{broken")
    assert CaseTable(tmp_path / "table.json", "t-v1", "test table").cases == {}


def test_shards_write_parts_that_a_plain_table_merges(tmp_path):
    parts = [
        CaseTable(tmp_path / "table.json", "t-v1", "test table", Shard(k, 2), derived=_derived(tmp_path))
        for k in range(2)
    ]
    parts[0].record({"a": {"x": 1}})
    parts[1].record({"b": {"x": 2}})
    assert not (tmp_path / "table.json").exists() and not (tmp_path / "table.csv").exists()
    assert parts[0].path.name == "table.part-1-of-2.json"
    # a shard started later sees what the other parts hold (what is done already)
    assert set(CaseTable(tmp_path / "table.json", "t-v1", "test table", Shard(0, 2)).cases) == {"a", "b"}
    merged = CaseTable(tmp_path / "table.json", "t-v1", "test table", derived=_derived(tmp_path))
    assert set(merged.cases) == {"a", "b"} and not list(tmp_path.glob("*.part-*"))
    assert (tmp_path / "table.csv").read_text() == "a,b\n"
    assert merged.merge_parts() is False  # nothing left to merge


def test_a_write_failure_names_the_file(tmp_path):
    blocked = tmp_path / "table.json"
    blocked.mkdir()  # a folder where the file should go
    table = CaseTable(blocked, "t-v1", "test table")
    with pytest.raises(MedsegError, match=r"table\.json: cannot write the test table"):
        table.record({"a": {}})
