"""The resolution lever inside ``medseg plan --time-budget`` (``medseg.pipeline.plan_and_preprocess``) on a
generated dataset of large images, with a step-time model instead of real timing: the plan trains 3d_lowres,
its cache is built at the coarser spacing, and the preprocessing seconds are recorded."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest

from medseg.io.synthetic import generate_synthetic_dataset
from medseg.pipeline import plan_and_preprocess
from medseg.planning import budget, levers, resolution
from medseg.planning.planner import PlannerOptions


def _slow_steps(net, cin, k, device, precision, channels_last, steps):
    """1 ms per 100 feature-voxel-samples: nothing converges in a 2-minute budget."""
    return 1e-5 * net.spec.base_features * math.prod(net.patch_size) * net.batch_size


@pytest.mark.parametrize("min_dice, coarse", [(0.5, True), (0.999, False)])
def test_plan_with_a_time_budget_trains_a_coarser_spacing(tmp_path, monkeypatch, min_dice, coarse):
    data = generate_synthetic_dataset(tmp_path / "data", num_cases=4, shape=(12, 96, 96), spacing=(4.0, 1.0, 1.0))
    monkeypatch.setattr(levers, "cpu_bf16_supported", lambda: False)
    fit = budget.fit_plan_to_budget
    monkeypatch.setattr(budget, "fit_plan_to_budget", partial(fit, measure_fn=_slow_steps))
    monkeypatch.setattr(resolution, "fit_plan_to_budget", partial(fit, measure_fn=_slow_steps))
    monkeypatch.setattr(resolution, "MIN_ROUNDTRIP_DICE", min_dice)
    result = plan_and_preprocess(data, tmp_path / "work", PlannerOptions(device="cpu", time_budget_minutes=2))
    plan = json.loads((tmp_path / "work" / "plans.json").read_text())
    notes = plan["notes"]["budget"]
    record = notes["resolution"]
    assert notes["preprocess_seconds"] > 0 and notes["fit_and_preprocess_seconds"] >= notes["preprocess_seconds"]
    assert [o["spacing"] for o in record["options"]] == [[4.0, 1.0, 1.0], [4.0, 1.5, 1.5], [4.0, 2.0, 2.0]]
    assert all(0 < d <= 1 for o in record["options"] for d in o["roundtrip_dice"].values())
    if coarse:
        assert plan["default_configuration"] == "3d_lowres" == result.plan.default_configuration
        low = result.plan.configuration("3d_lowres")
        assert low.spacing[0] == 4.0 and low.spacing[1] > 1.0
        cache = tmp_path / "work" / "preprocessed" / low.data_identifier
        assert sorted(p.name for p in cache.glob("*.json")) == [f"case_{i:03d}.json" for i in range(4)]
    else:
        assert plan["default_configuration"] == "3d_fullres"
        assert "3d_lowres" not in plan["configurations"]
        assert record["decision"].startswith("kept the planned spacing")
