"""The final validation in a time budget: estimate, shortening up front and enforcement at run time."""

from __future__ import annotations

import json
import time

import pytest
import torch

from medseg.clock import Deadline
from medseg.inference import time_budget as tb
from medseg.inference.time_budget import case_seconds
from medseg.planning.stage import Stage
from medseg.training import validation_budget as vb
from medseg.training.validation_budget import ValidationBudget, ValidationClock, ValidationNetwork, plan_validation

PATCH = (20, 20, 20)
STRIDE = (8, 8, 8)
SHAPE = (40, 40, 40)  # 3 positions per axis at step 0.5: 27 windows
OVERHEAD = tb.CASE_SECONDS + 40**3 * 4 * tb.VOXEL_CLASS_SECONDS  # per case, 4 classes
NET = ValidationNetwork(PATCH, 4, (0, 1, 2), STRIDE, use_tta=True)


def _plan(limit, n=3):
    shapes = {f"c{i}": SHAPE for i in range(n)}
    return plan_validation(shapes, NET, 0.1, limit=limit)


def test_the_full_validation_is_kept_when_it_fits():
    full = _plan(None)
    assert (full.passes, full.cases, full.skipped, full.shortened, full.note()) == (
        8,
        ("c0", "c1", "c2"),
        (),
        False,
        None,
    )
    assert full.seconds == pytest.approx(vb.SETUP_SECONDS + 3 * (8 * 2.7 + OVERHEAD))
    assert _plan(full.seconds + 0.01).passes == 8


def test_fewer_tta_passes_first_then_fewer_cases():
    one_case = {p: 27 * 0.1 * p + OVERHEAD for p in (8, 4, 2, 1)}
    at4 = _plan(vb.SETUP_SECONDS + 3 * one_case[4] + 0.01)
    assert (at4.passes, len(at4.cases)) == (4, 3) and at4.shortened
    assert "4 TTA pass(es) per window instead of 8" in at4.note()
    subset = _plan(vb.SETUP_SECONDS + 2 * one_case[1] + 0.01)
    assert (subset.passes, subset.cases, subset.skipped) == (1, ("c0", "c1"), ("c2",))
    assert "2 of 3 held-out cases" in subset.note() and subset.seconds <= subset.limit
    nothing = _plan(1.0)
    assert (nothing.cases, nothing.seconds) == ((), 0.0) and "not even one held-out case" in nothing.note()


def _clock(seconds_left, n=2, spw=0.1):
    budget = ValidationBudget(Deadline.after(seconds_left), spw, {f"c{i}": SHAPE for i in range(n)})
    return ValidationClock(budget, [f"c{i}" for i in range(n)], NET)


def test_the_clock_lowers_the_passes_to_the_time_left_and_skips_what_does_not_fit():
    per_case_8 = 8 * 2.7 + OVERHEAD
    clock = _clock(vb.SETUP_SECONDS + 2 * per_case_8 + 5)
    assert clock.plan.passes == 8 and clock.passes_for("c0") == 8
    # the first case took twice its estimate: the second is estimated at twice too, and gets fewer passes
    clock.done("c0", 8, 2 * case_seconds(SHAPE, PATCH, 4, 0.1, 8, (0, 1, 2), STRIDE))
    clock.budget = ValidationBudget(Deadline.after(2 * (4 * 2.7 + OVERHEAD) + 1), 0.1, clock.budget.shapes)
    assert clock.passes_for("c1") == 4
    clock.budget = ValidationBudget(Deadline.after(1.0), 0.1, clock.budget.shapes)
    assert clock.passes_for("c1") is None
    rec = clock.record()
    assert rec["tta_passes"] == {"c0": 8} and "not enough time left" in rec["skipped_cases"]["c1"]
    assert rec["shortened"] and rec["note"]
    json.dumps(rec)


def test_a_case_the_deadline_cuts_short_is_recorded_as_skipped():
    clock = _clock(0.0)
    assert clock.over()
    clock.interrupted("c0")
    assert "cut short" in clock.record()["skipped_cases"]["c0"]


def test_measure_forward_seconds_restores_train_mode():
    model = torch.nn.Conv3d(1, 2, 3, padding=1)
    sec = vb.measure_forward_seconds(model, 1, (8, 8, 8), 2, torch.device("cpu"), None, False)
    assert sec > 0 and model.training


class _Slow(torch.nn.Module):
    """A network that takes ``delay`` seconds per patch and predicts background everywhere (per patch, so
    the time does not depend on the inference batch size)."""

    def __init__(self, num_classes: int, delay: float) -> None:
        super().__init__()
        self.num_classes, self.delay = num_classes, delay
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        time.sleep(self.delay * x.shape[0])
        out = torch.zeros((x.shape[0], self.num_classes, *x.shape[2:]))
        out[:, 0] = 1.0
        return out


def test_validate_run_stops_at_the_deadline_and_records_what_it_skipped(tiny_work):
    from medseg.planning.plan import Plan
    from medseg.training.validation import validate_run

    plan = Plan.load(tiny_work / "plans.json")
    ids = sorted(json.loads((tiny_work / "dataset_ref.json").read_text())["cases"])[:3]
    from medseg.preprocessing import load_case

    shapes = {c: load_case(tiny_work, plan, "3d_fullres", c)[0].shape[1:] for c in ids}
    run = tiny_work / "runs" / "x"
    # the estimate (0.01 s per window) lets the first case start without TTA, but each patch takes 0.1 s:
    # the deadline comes during its prediction, which is abandoned; the rest is skipped; nothing raises
    budget = ValidationBudget(Deadline.after(4.0), 0.01, shapes)
    t = time.perf_counter()
    stage = Stage.resolve(plan, "3d_fullres", "unet")
    metrics = validate_run(
        _Slow(plan.num_classes, 0.1), stage, tiny_work, run, ids, save_probabilities=False, budget=budget
    )
    assert time.perf_counter() - t < 4.0 + 1.5
    rec = metrics["time_budget"]
    assert rec["shortened"] and set(rec["skipped_cases"]) | set(rec["tta_passes"]) == set(ids)
    assert any("cut short" in why for why in rec["skipped_cases"].values())
    assert metrics["num_cases"] == len(rec["tta_passes"]) < len(ids)
    written = json.loads((run / "validation" / "metrics.json").read_text())
    assert written["time_budget"] == rec and written["validation_seconds"] > 0


def test_the_clock_prefers_every_case_with_fewer_passes_to_fewer_cases():
    one = {p: 27 * 0.1 * p + OVERHEAD for p in (8, 4, 2, 1)}
    assert _clock(3 * one[2] + 0.5, n=3).passes_for("c0") == 2  # all three at 2 passes, not one at 8
    assert _clock(1.5 * one[1], n=3).passes_for("c0") == 1  # not even one pass each: the first case alone
    late = _clock(3 * one[1] + 0.5, n=3)
    late.done("c0", 1, 0.1 * late._raw("c0", 1))  # the estimates were 10x too slow: later cases get the full TTA
    assert late.passes_for("c1") == 8
