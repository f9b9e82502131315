"""Time-budget fitting: the choice rule with an injected step-time model, the notes, plan validity and a
real (tiny) fit."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from medseg.errors import PlanError
from medseg.planning import candidates
from medseg.planning import levers as lever_module
from medseg.planning.budget import (
    MIN_SAMPLES_3D,
    USABLE_FRACTION,
    Measured,
    choose_candidate,
    fit_plan_to_budget,
)
from medseg.planning.candidates import Candidate
from medseg.planning.plan import Plan

from .conftest import PATCH, hippocampus_like_plan

VOX = math.prod(PATCH)


class FakeClock:
    """Step time = per-step overhead + cost per feature-voxel-sample; channels-last 10% faster, bf16 2x."""

    def __init__(self, overhead: float = 0.05, per_unit: float = 1e-7, device: str = "cpu") -> None:
        self.overhead, self.per_unit, self.device = overhead, per_unit, device
        self.calls: list[tuple[int, tuple[int, ...], int, str, bool]] = []

    def __call__(self, net, cin, k, device, precision, channels_last, steps):
        assert (cin, k, device, steps) == (1, 3, self.device, 3)
        self.calls.append((net.spec.base_features, tuple(net.patch_size), net.batch_size, precision, channels_last))
        t = self.overhead + self.per_unit * net.spec.base_features * math.prod(net.patch_size) * net.batch_size
        return t * (0.9 if channels_last else 1.0) * (0.5 if precision == "bf16" else 1.0)

    def samples(self, features: int, batch: int, minutes: float) -> int:
        t = (self.overhead + self.per_unit * features * VOX * batch) * 0.9
        return int(math.floor(minutes * 60 * USABLE_FRACTION / round(t, 6))) * batch


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(lever_module, "cpu_bf16_supported", lambda: False)


def chosen(plan: Plan) -> tuple[int, tuple[int, ...], int]:
    net = plan.configuration("3d_fullres").network("unet")
    return net.spec.base_features, net.patch_size, net.batch_size


@pytest.mark.parametrize(
    "minutes, expected, why",
    [
        # only the 16-feature candidates reach MIN_SAMPLES: the smallest/fastest wins, batch 4 (more samples)
        (15, (16, PATCH, 4), "2 of 5 measured candidates converge"),
        # 16 and 24 features converge, 32 does not: the largest converging width
        (22, (24, PATCH, 4), "24f 40x56x40 b4 has the largest capacity"),
        # everything converges: the biggest network wins
        (60, (32, PATCH, 4), "6 of 6"),
        # nothing converges: the most samples per second wins
        (5, (16, PATCH, 4), "no candidate converges"),
    ],
)
def test_choice_rule(no_bf16, minutes, expected, why):
    clock = FakeClock()
    plan = fit_plan_to_budget(hippocampus_like_plan(), "cpu", minutes, configuration="3d_fullres", measure_fn=clock)
    assert chosen(plan) == expected
    notes = plan.notes["budget"]
    assert why in notes["reasoning"]
    # the recorded numbers are the rule's own inputs and outputs
    f, _, b = expected
    assert notes["chosen"]["samples"] == clock.samples(f, b, minutes)
    for row in notes["candidates"]:
        if row["step_time_s"] is not None:
            assert row["iterations"] == math.floor(minutes * 60 * USABLE_FRACTION / row["step_time_s"])
            assert row["converges"] == (row["samples"] >= MIN_SAMPLES_3D)
    assert notes["chosen"]["base_features"] == f


def test_thresholds_of_the_fake_are_where_the_tests_assume(no_bf16):
    clock = FakeClock()
    assert clock.samples(16, 2, 15) >= MIN_SAMPLES_3D > max(clock.samples(24, 4, 15), clock.samples(24, 2, 15))
    assert clock.samples(24, 2, 22) >= MIN_SAMPLES_3D > max(clock.samples(32, 4, 22), clock.samples(32, 2, 22))
    assert max(clock.samples(16, 4, 5), clock.samples(16, 2, 5)) < MIN_SAMPLES_3D


def test_notes_record_every_candidate_and_the_levers(no_bf16):
    clock = FakeClock()
    plan = fit_plan_to_budget(hippocampus_like_plan(), "cpu", 60, configuration="3d_fullres", measure_fn=clock)
    notes = plan.notes["budget"]
    assert notes["device"] == "cpu" and notes["minutes"] == 60.0 and notes["configuration"] == "3d_fullres"
    assert len(notes["candidates"]) == 6
    assert all(r["status"].startswith("measured") for r in notes["candidates"])
    for r in notes["candidates"]:
        expect = clock.overhead + clock.per_unit * r["base_features"] * VOX * r["batch_size"]
        assert r["step_time_s"] == pytest.approx(expect * 0.9, rel=1e-5)
        assert r["precision"] == "fp32" and r["channels_last"] is True
    # levers: measured once on the widest candidate at the smallest batch; channels-last is faster in the fake
    levers = notes["levers"]
    assert levers["measured_on"]["base_features"] == 32 and levers["measured_on"]["batch_size"] == 2
    assert [(r["precision"], r["channels_last"]) for r in levers["results"]] == [("fp32", False), ("fp32", True)]
    assert levers["chosen"] == {"precision": "fp32", "channels_last": True}
    assert "bf16" in levers["options"]  # says why bf16 was not tried
    # the lever candidate is not measured twice: 2 lever settings + 5 other candidates
    assert len(clock.calls) == 7
    assert notes["chosen"]["channels_last"] is True
    assert isinstance(notes["reasoning"], str) and "channels-last on" in notes["reasoning"]


def test_bf16_is_kept_when_native_and_faster(monkeypatch):
    monkeypatch.setattr(lever_module, "cpu_bf16_supported", lambda: True)
    plan = fit_plan_to_budget(hippocampus_like_plan(), "cpu", 15, configuration="3d_fullres", measure_fn=FakeClock())
    net = plan.configuration("3d_fullres").network()
    assert net.precision == "bf16"
    # twice as fast: 32 features now converge in 15 minutes, where only 16 did at fp32
    assert net.spec.base_features == 32
    assert len(plan.notes["budget"]["levers"]["results"]) == 4


def test_dominated_candidates_are_skipped_when_a_cheaper_one_cannot_converge(no_bf16):
    clock = FakeClock()
    plan = fit_plan_to_budget(hippocampus_like_plan(), "cpu", 5, configuration="3d_fullres", measure_fn=clock)
    # levers on 32f b2 (2 settings) + 16f b2 + 16f b4; 24f and 32f b4 are never measured
    assert sorted((f, b) for f, _, b, _, _ in clock.calls) == [(16, 2), (16, 4), (32, 2), (32, 2)]
    rows = {(r["base_features"], r["batch_size"]): r for r in plan.notes["budget"]["candidates"]}
    assert rows[(24, 2)]["status"].startswith("skipped") and rows[(24, 2)]["step_time_s"] is None
    assert rows[(32, 4)]["status"].startswith("skipped") and rows[(24, 4)]["status"].startswith("skipped")
    assert rows[(32, 2)]["status"] == "measured (lever candidate)" and rows[(16, 4)]["status"] == "measured"


def test_returned_plan_is_valid_consistent_and_round_trips(no_bf16):
    original = hippocampus_like_plan()
    plan = fit_plan_to_budget(original, "cpu", 22, configuration="3d_fullres", measure_fn=FakeClock())
    assert plan.validate() is plan
    assert Plan.from_json(plan.to_json()) == plan
    cfg = plan.configuration("3d_fullres")
    net = cfg.network("unet")
    assert (cfg.patch_size, cfg.batch_size) == (net.patch_size, net.batch_size)
    assert net.spec.strides == original.configuration("3d_fullres").network().spec.strides
    assert net.estimated_memory_gb is not None and net.estimated_memory_gb > 0
    assert plan.default_configuration == "3d_fullres"
    assert plan.device == "cpu" and plan.time_budget_minutes == 22.0
    # everything else is untouched
    assert cfg.networks["deeplab"] == original.configuration("3d_fullres").networks["deeplab"]
    assert plan.configurations["2d"] == original.configurations["2d"]
    assert plan.notes["planner"] == "test"
    assert original.time_budget_minutes is None and "budget" not in original.notes


def test_explicit_candidates_and_default_configuration(no_bf16):
    clock = FakeClock()
    plan = hippocampus_like_plan()
    cands = [Candidate(8, 80, (24, 32, 24), 2), Candidate(16, 160, PATCH, 2)]
    out = fit_plan_to_budget(plan, "cpu", 60, configuration="3d_fullres", candidates=cands, measure_fn=clock)
    assert chosen(out) == (16, PATCH, 2)
    assert {c[:3] for c in clock.calls} == {(16, PATCH, 2), (8, (24, 32, 24), 2)}


def test_2d_configuration_uses_its_own_grid(no_bf16):
    calls = []

    def fake(net, cin, k, device, precision, channels_last, steps):
        calls.append(net.batch_size)
        return 1e-3 * net.batch_size * net.spec.base_features / 16

    out = fit_plan_to_budget(hippocampus_like_plan(), "cpu", 30, measure_fn=fake)  # default configuration: 2d
    net = out.configuration("2d").network()
    assert out.default_configuration == "2d"
    assert set(calls) == set(candidates.BATCH_GRID[2])
    assert net.spec.base_features == 32 and net.spec.max_features == 512
    assert out.configurations["3d_fullres"] == hippocampus_like_plan().configurations["3d_fullres"]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"minutes": 0}, "positive number of minutes"),
        ({"minutes": float("nan")}, "positive number of minutes"),
        ({"device": "tpu"}, "device must be"),
        ({"configuration": "3d_lowres"}, "3d_lowres"),
        ({"candidates": [Candidate(16, 160, (42, 56, 40), 2)]}, "not divisible"),
    ],
)
def test_bad_arguments_are_refused(kwargs, needle):
    args = {"device": "cpu", "minutes": 10.0, "configuration": "3d_fullres", **kwargs}
    with pytest.raises(PlanError) as info:
        fit_plan_to_budget(
            hippocampus_like_plan(), args.pop("device"), args.pop("minutes"), measure_fn=FakeClock(), **args
        )
    assert needle in str(info.value)


def test_out_of_memory_candidates_are_never_chosen(no_bf16):
    def fake(net, cin, k, device, precision, channels_last, steps):
        return math.inf if net.spec.base_features == 16 else 0.01

    out = fit_plan_to_budget(hippocampus_like_plan(), "cpu", 10, configuration="3d_fullres", measure_fn=fake)
    assert chosen(out)[0] == 32
    rows = [r for r in out.notes["budget"]["candidates"] if r["base_features"] == 16]
    assert all(r["status"] == "out of memory" and r["step_time_s"] is None for r in rows)
    json.loads(out.to_json())  # no Infinity in the notes


def test_cuda_drops_candidates_over_the_gpu_memory_budget_and_uses_amp():
    plan = replace(hippocampus_like_plan(), gpu_memory_gb=0.25)  # 24f/32f at batch 4 need more (~0.3/0.4 GB)
    clock = FakeClock(device="cuda")
    out = fit_plan_to_budget(plan, "cuda", 60, configuration="3d_fullres", measure_fn=clock)
    assert chosen(out) == (32, PATCH, 2)
    assert out.device == "cuda"
    assert out.configuration("3d_fullres").network().precision in ("fp16", "bf16")
    assert {p for *_, p, _ in clock.calls} <= {"fp16", "bf16"}
    rows = {(r["base_features"], r["batch_size"]): r for r in out.notes["budget"]["candidates"]}
    assert rows[(32, 4)]["status"].startswith("excluded") and rows[(24, 4)]["status"].startswith("excluded")
    assert (32, 4) not in {(f, b) for f, _, b, _, _ in clock.calls}


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PlanError, match="no CUDA device"):
        fit_plan_to_budget(hippocampus_like_plan(), "cuda", 30)


def test_choose_candidate_ties_go_to_more_samples():
    a = Measured(Candidate(16, 160, PATCH, 2), 0.10)
    b = Measured(Candidate(16, 160, PATCH, 4), 0.19)
    idx, why = choose_candidate([a, b], 600.0, 3)
    assert idx == 1 and "more samples" in why
    with pytest.raises(PlanError):
        choose_candidate([Measured(Candidate(16, 160, PATCH, 2), None, "skipped")], 600.0, 3)


def test_real_fit_end_to_end_on_tiny_candidates(one_thread):
    plan = hippocampus_like_plan()
    cands = [Candidate(4, 16, (8, 16, 16), 2), Candidate(8, 32, (8, 16, 16), 2)]
    out = fit_plan_to_budget(plan, "cpu", 1.0, configuration="3d_fullres", candidates=cands, measure_steps=1)
    notes = out.notes["budget"]
    assert all(r["step_time_s"] is not None and r["step_time_s"] > 0 for r in notes["candidates"])
    assert chosen(out)[1] == (8, 16, 16)
    assert Plan.from_json(out.to_json()) == out
