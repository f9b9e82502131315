"""The annotation-driven dataclass <-> JSON codec (medseg.io.codec)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from medseg.errors import ConfigError, PlanError
from medseg.io.codec import from_json_dict, to_json_dict
from medseg.options import Precision


@dataclass(frozen=True)
class Inner:
    name: str
    size: tuple[int, ...]
    weight: float = 1.0


@dataclass(frozen=True)
class Outer:
    schema_version: int
    inner: Inner
    kernels: tuple[tuple[int, int, int], ...]
    pair: tuple[float, str]
    items: dict[str, Inner] = field(default_factory=dict)
    by_class: dict[int, list[list[int]]] = field(default_factory=dict)
    order: tuple[int, ...] | None = None
    precision: Precision = Precision.FP32
    fold: int | str = 0
    flag: bool = False
    notes: Any = None
    tags: list[str] = field(default_factory=list)


FULL = Outer(
    schema_version=2,
    inner=Inner("a", (1, 2, 3), 0.5),
    kernels=((3, 3, 3), (1, 3, 3)),
    pair=(1.5, "x"),
    items={"3d": Inner("b", (4,))},
    by_class={1: [[0, 1, 2]], 2: []},
    order=(2, 1),
    precision=Precision.BF16,
    fold="all",
    flag=True,
    notes={"budget": {"chosen": [1, 2]}},
    tags=["t"],
)


def test_round_trip_is_exact_and_writes_only_builtins():
    d = to_json_dict(FULL)
    assert json.loads(json.dumps(d)) == d  # builtins only: JSON writes and reads it unchanged
    assert d["kernels"] == [[3, 3, 3], [1, 3, 3]] and d["by_class"] == {"1": [[0, 1, 2]], "2": []}
    assert type(d["precision"]) is str and d["precision"] == "bf16"
    back = from_json_dict(Outer, json.loads(json.dumps(d)), "doc")
    assert back == FULL
    assert isinstance(back.precision, Precision) and back.kernels[1] == (1, 3, 3) and back.fold == "all"
    assert isinstance(back.pair[0], float) and list(back.by_class) == [1, 2]


def test_defaults_none_numbers_and_numpy():
    minimal = {"schema_version": 1, "inner": {"name": "a", "size": [2]}, "kernels": [], "pair": [1, "y"]}
    out = from_json_dict(Outer, minimal, "doc")
    assert out.order is None and out.items == {} and out.fold == 0 and out.inner.weight == 1.0
    assert out.pair == (1.0, "y") and isinstance(out.pair[0], float)  # an integer is read as a float
    assert from_json_dict(Inner, {"name": "a", "size": [2.0]}, "doc").size == (2,)  # integral floats as ints
    assert to_json_dict(Inner("a", (np.int64(3),), np.float32(0.5))) == {"name": "a", "size": [3], "weight": 0.5}


def test_every_problem_is_reported_at_once_with_its_dotted_path():
    bad = {
        "schema_version": "2",
        "inner": {"name": "a", "bogus": 1},
        "kernels": [[3, 3]],
        "pair": [1.0, "x"],
        "items": {"2d": {"name": 5, "size": [1]}},
        "precision": "fp8",
        "flag": 1,
        "extra": 0,
    }
    with pytest.raises(PlanError) as info:
        from_json_dict(Outer, bad, "plan", PlanError)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("plan: unknown key(s) ['extra']; allowed: [")
    expected = [
        "plan.schema_version: expected integers, got '2'",
        "plan.inner: unknown key(s) ['bogus']; allowed: ['name', 'size', 'weight']",
        "plan.inner: missing key 'size'",
        "plan.kernels[0]: expected 3 values, got 2",
        "plan.items.2d.name: expected a string, got 5",
        "plan.precision: expected one of ['auto', 'fp32', 'bf16', 'fp16'], got 'fp8'",
        "plan.flag: expected true or false, got 1",
    ]
    for line in expected:
        assert line in lines, (line, lines)
    assert len(lines) == 1 + len(expected)


def test_a_single_problem_reads_like_the_loaders_messages():
    with pytest.raises(ConfigError, match=r"^cfg: missing key 'name'$"):
        from_json_dict(Inner, {"size": [1]}, "cfg", ConfigError)
    with pytest.raises(ConfigError, match=r"^cfg: unknown key\(s\) \['x'\]; allowed: \['name', 'size', 'weight'\]$"):
        from_json_dict(Inner, {"name": "a", "size": [1], "x": 0}, "cfg", ConfigError)
    with pytest.raises(ConfigError, match=r"^cfg: expected an object, got list$"):
        from_json_dict(Inner, [], "cfg", ConfigError)
    with pytest.raises(ConfigError, match=r"^cfg.order: expected a list, got str$"):
        from_json_dict(Outer, {**to_json_dict(FULL), "order": "21"}, "cfg", ConfigError)


def test_values_json_cannot_hold_are_refused():
    with pytest.raises(TypeError, match="cannot write a object"):
        to_json_dict(Inner("a", (1,), object()))  # type: ignore[arg-type]
