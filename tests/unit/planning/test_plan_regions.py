"""Plan.regions / regions_class_order: serialised in plans.json, optional for old plans, checked."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medseg.errors import PlanError
from medseg.planning.plan import Plan

from .test_plan_dataclasses import make_plan


def _region_plan(**kw) -> Plan:
    # make_plan's label_ids are (0, 1, 5, 117)
    return dataclasses.replace(
        make_plan(), regions=((1, 5, 117), (5, 117), (117,)), regions_class_order=(1, 5, 117), **kw
    ).validate()


def test_regions_round_trip_and_set_the_outputs():
    plan = _region_plan(ignore_label=200)
    assert plan.is_region_based and plan.num_classes == 3
    assert plan.region_classes == ((1, 2, 3), (2, 3), (3,))
    assert plan.ignore_class == 4  # one past the label classes, not the region count
    d = json.loads(plan.to_json())
    assert d["regions"] == [[1, 5, 117], [5, 117], [117]] and d["regions_class_order"] == [1, 5, 117]
    assert Plan.from_json(plan.to_json()) == plan


def test_plans_without_regions_keep_their_json_and_old_plans_load():
    d = json.loads(make_plan().to_json())
    assert "regions" not in d and "regions_class_order" not in d
    plan = Plan.from_dict(d)
    assert not plan.is_region_based and plan.num_classes == 4 and plan.region_classes == ()


@pytest.mark.parametrize(
    "regions, order, expected",
    [
        ([[1, 5]], None, "together"),
        ([[1, 5], [5]], [1], "2 regions"),
        ([[1, 2]], [1], r"regions\[0\]"),
        ([[1]], [0], "regions_class_order"),
    ],
)
def test_inconsistent_regions_are_refused(regions, order, expected):
    d = json.loads(make_plan().to_json())
    d["regions"], d["regions_class_order"] = regions, order
    with pytest.raises(PlanError, match=expected):
        Plan.from_dict(d)
