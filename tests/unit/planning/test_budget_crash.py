"""A step that crashes its process natively must not crash the budget fit, nor be chosen (issue 42).

The fast tests inject crashes through ``measure_fn`` (a :class:`StepTiming` whose status says so); the
regression test runs the real measurement, in child processes, with the test-only fault
``step_probe:bf16=segv`` (:mod:`medseg.faults`) killing every child that steps at bf16.
"""

from __future__ import annotations

import json
import math

import pytest

from medseg import faults
from medseg.errors import PlanError
from medseg.planning import fit_clock, levers
from medseg.planning.budget import fit_plan_to_budget
from medseg.planning.candidates import Candidate
from medseg.planning.plan import Plan
from medseg.planning.step_timing import StepTiming

from .conftest import hippocampus_like_plan

SEGV = StepTiming(math.inf, "crashed (SIGSEGV)")


class CrashingClock:
    """Step time linear in features x voxels x batch, bf16 twice as fast; ``crash(net, precision, channels_last)``
    says which settings kill their process. Every call advances a virtual clock (for the time limit)."""

    def __init__(self, crash) -> None:
        self.crash, self.now = crash, 0.0
        self.calls: list[tuple[int, tuple[int, ...], int, str, bool, int]] = []

    def __call__(self, net, cin, k, device, precision, channels_last, steps):
        self.calls.append(
            (net.spec.base_features, tuple(net.patch_size), net.batch_size, precision, channels_last, steps)
        )
        self.now += 1.0
        if self.crash(net, precision, channels_last):
            return SEGV
        t = 0.05 + 1e-7 * net.spec.base_features * math.prod(net.patch_size) * net.batch_size
        return t * (0.9 if channels_last else 1.0) * (0.5 if precision == "bf16" else 1.0)


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(levers, "cpu_bf16_supported", lambda: True)


@pytest.fixture
def armed():
    yield faults.arm
    faults.arm(None)


def _net(plan: Plan):
    return plan.configuration("3d_fullres").network("unet")


def _chosen_row(notes):
    c = notes["chosen"]
    return next(
        r
        for r in notes["candidates"]
        if (r["base_features"], r["patch_size"], r["batch_size"])
        == (c["base_features"], c["patch_size"], c["batch_size"])
    )


def test_crashed_bf16_levers_fall_back_to_fp32(bf16_cpu):
    clock = CrashingClock(lambda net, p, cl: p == "bf16")
    plan = fit_plan_to_budget(hippocampus_like_plan(), "cpu", 15, configuration="3d_fullres", measure_fn=clock)
    notes = plan.notes["budget"]
    assert _net(plan).precision == "fp32" and notes["chosen"]["precision"] == "fp32"
    results = {(r["precision"], r["channels_last"]): r for r in notes["levers"]["results"]}
    assert results[("bf16", True)]["status"] == "crashed (SIGSEGV)" and results[("bf16", True)]["step_time_s"] is None
    assert results[("fp32", True)]["status"] == "measured"
    assert {(c["precision"], c["status"]) for c in notes["crashes"]} == {("bf16", "crashed (SIGSEGV)")}
    assert "crashed" in notes["reasoning"]
    assert all(p == "fp32" for *_, p, _, _ in clock.calls[4:])  # the grid is measured at fp32 only
    json.loads(plan.to_json())


def test_a_crashing_probe_is_repeated_at_fp32_and_never_chosen(bf16_cpu, monkeypatch):
    """The issue's case: the time-limited fit's first probe (bf16, channels-last: the CPU default) dies."""
    clock = CrashingClock(lambda net, p, cl: p == "bf16" and cl)
    monkeypatch.setattr(fit_clock, "_clock", lambda: clock.now)
    plan = fit_plan_to_budget(
        hippocampus_like_plan(), "cpu", 30, configuration="3d_fullres", measure_fn=clock, max_seconds=180.0
    )
    notes = plan.notes["budget"]
    assert clock.calls[0][3:5] == ("bf16", True) and clock.calls[1][3:5] == ("fp32", True)  # probe, then again
    probe = notes["levers"]["probe"]
    assert (probe["precision"], probe["channels_last"]) == ("fp32", True) and probe["step_time_s"] is not None
    assert probe["crashed"] == [{"precision": "bf16", "channels_last": True, "status": "crashed (SIGSEGV)"}]
    assert ("bf16", True) not in {c[3:5] for c in clock.calls[2:]}  # the crashed setting is not measured again
    assert (notes["chosen"]["precision"], notes["chosen"]["channels_last"]) != ("bf16", True)
    assert _net(plan).precision == notes["chosen"]["precision"]
    assert _chosen_row(notes)["status"].startswith("measured")


def test_a_grid_candidate_that_crashes_at_the_levers_is_measured_at_the_fallback(bf16_cpu):
    # bf16 runs on the lever candidate (smallest patch) but kills the process at the full 40x56x40 patch
    big = math.prod((40, 56, 40))
    clock = CrashingClock(lambda net, p, cl: p == "bf16" and math.prod(net.patch_size) >= big)
    cands = [Candidate(16, 160, (40, 56, 40), 2), Candidate(32, 320, (24, 32, 24), 2)]
    plan = fit_plan_to_budget(
        hippocampus_like_plan(), "cpu", 60, configuration="3d_fullres", candidates=cands, measure_fn=clock
    )
    notes = plan.notes["budget"]
    assert notes["levers"]["chosen"]["precision"] == "bf16"
    rows = {r["base_features"]: r for r in notes["candidates"]}
    assert rows[16]["precision"] == "fp32" and rows[16]["step_time_s"] is not None
    assert rows[16]["status"] == "measured at fp32 channels-last (crashed (SIGSEGV) at bf16 channels-last)"
    assert rows[32]["precision"] == "bf16"
    # whichever wins, it trains at the precision it was measured at without a crash
    row = _chosen_row(notes)
    assert _net(plan).precision == row["precision"] == notes["chosen"]["precision"]
    assert "crashed" not in row["status"].split("(")[0]


def test_every_setting_crashing_is_a_clear_error(bf16_cpu):
    clock = CrashingClock(lambda net, p, cl: True)
    with pytest.raises(PlanError, match="crashed"):
        fit_plan_to_budget(hippocampus_like_plan(), "cpu", 15, configuration="3d_fullres", measure_fn=clock)


def test_real_fit_survives_a_probe_that_kills_its_process(bf16_cpu, armed, one_thread):
    """Regression (issue 42): bf16 steps die of SIGSEGV in their measuring process; the fit still writes a
    valid plan, at fp32, and records the crashes."""
    armed("step_probe:bf16=segv")
    cands = [Candidate(4, 16, (8, 16, 16), 2), Candidate(8, 32, (8, 16, 16), 2)]
    plan = fit_plan_to_budget(
        hippocampus_like_plan(),
        "cpu",
        1.0,
        configuration="3d_fullres",
        candidates=cands,
        measure_steps=1,
        max_seconds=120.0,
    )
    notes = plan.notes["budget"]
    assert Plan.from_json(plan.to_json()) == plan
    assert _net(plan).precision == "fp32" and notes["chosen"]["precision"] == "fp32"
    assert notes["levers"]["probe"]["crashed"][0]["status"] == "crashed (SIGSEGV)"
    assert notes["crashes"] and all(
        c["precision"] == "bf16" and c["status"] == "crashed (SIGSEGV)" for c in notes["crashes"]
    )
    assert all(r["status"].startswith("measured") and r["precision"] == "fp32" for r in notes["candidates"])
    assert notes["isolation"]["children"] >= 3 and notes["torch_threads"] == 1
    spread = _chosen_row(notes)["spread"]
    assert spread["min_s"] == pytest.approx(notes["chosen"]["step_time_s"], abs=1e-6)
