"""Plan.ignore_label: serialised in plans.json, optional for old plans, checked, and never a class."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medseg.errors import PlanError
from medseg.planning.plan import Plan

from .test_plan_dataclasses import make_plan


def test_ignore_label_round_trips_and_is_no_class():
    plan = dataclasses.replace(make_plan(), ignore_label=200).validate()
    assert plan.num_classes == 4 and plan.ignore_class == 4  # label_ids (0, 1, 5, 117) without the ignore id
    d = json.loads(plan.to_json())
    assert d["ignore_label"] == 200
    assert Plan.from_json(plan.to_json()) == plan


def test_old_plans_without_the_key_load():
    d = json.loads(make_plan().to_json())
    del d["ignore_label"]
    plan = Plan.from_dict(d)
    assert plan.ignore_label is None and plan.ignore_class is None


@pytest.mark.parametrize("bad", [117, 5, 0, "x", 3.5])
def test_ignore_label_must_lie_above_every_label_id(bad):
    d = json.loads(make_plan().to_json())
    d["ignore_label"] = bad
    with pytest.raises(PlanError, match="ignore_label"):
        Plan.from_dict(d)
