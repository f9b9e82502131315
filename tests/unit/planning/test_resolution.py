"""The resolution lever of the time-budget fit: spacings tried, the choice rule, and the whole lever on a
planner-made large-image plan with an injected step-time model."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from medseg.planning import levers
from medseg.planning.budget import MIN_SAMPLES_3D, Measured, fit_plan_to_budget, patch_coverage
from medseg.planning.candidates import Candidate
from medseg.planning.planner import PlannerOptions, plan_dataset
from medseg.planning.resolution import (
    COARSE_CONFIGURATION,
    MIN_GAIN,
    SpacingOption,
    choose_spacing,
    coarser_spacings,
    fit_resolution,
)

from .conftest import hippocampus_like_plan, make_ds, make_fp, reference_estimator

BUDGET_S = 1800.0


def step_time(net, cin, k, device, precision, channels_last, steps):
    """1 us per feature-voxel-sample: the same cost per voxel at every spacing."""
    return 1e-6 * net.spec.base_features * math.prod(net.patch_size) * net.batch_size


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(levers, "cpu_bf16_supported", lambda: False)


def test_coarser_spacings_keep_the_coarse_axis_of_anisotropic_data():
    assert coarser_spacings((7.7, 1.25, 1.25)) == [(7.7, 1.875, 1.875), (7.7, 2.5, 2.5)]
    assert coarser_spacings((1.0, 1.0, 1.0)) == [(1.5, 1.5, 1.5), (2.0, 2.0, 2.0)]
    # a fine axis is never made coarser than the coarse one
    assert coarser_spacings((4.0, 1.25, 1.25), factors=(4.0,)) == [(4.0, 4.0, 4.0)]


def test_patch_coverage_is_capped_at_the_image():
    assert patch_coverage((40, 56, 40), (36, 50, 35)) == 1.0
    assert patch_coverage((28, 96, 96), (35, 248, 256)) == pytest.approx(28 * 96 * 96 / (35 * 248 * 256))
    assert patch_coverage((28, 96, 96), None) == 1.0


def _option(spacing, step, coverage, worst=0.99, admissible=True):
    m = Measured(Candidate(16, 160, (32, 64, 64), 2), step, "predicted", coverage)
    return SpacingOption(tuple(spacing), {"a": worst, "b": 1.0}, admissible, m)


def test_choose_spacing_takes_the_finest_that_reaches_the_bar():
    options = [_option((1, 1, 1), 1.0, 0.1), _option((1.5, 1.5, 1.5), 0.5, 1.0), _option((2, 2, 2), 0.2, 1.0)]
    assert options[0].samples(BUDGET_S) < MIN_SAMPLES_3D <= options[1].samples(BUDGET_S)
    pick, why = choose_spacing(options, BUDGET_S, MIN_SAMPLES_3D)
    assert pick == 1 and "reaches" in why


def test_choose_spacing_without_convergence_takes_the_most_and_skips_inadmissible():
    options = [
        _option((1, 1, 1), 2.0, 0.1),
        _option((1.5, 1.5, 1.5), 1.0, 0.5),
        _option((2, 2, 2), 0.5, 1.0, worst=0.9, admissible=False),
    ]
    pick, why = choose_spacing(options, BUDGET_S, MIN_SAMPLES_3D)
    assert pick == 1 and "closest to" in why


def test_choose_spacing_keeps_resolution_for_a_small_gain():
    base = _option((1, 1, 1), 2.0, 0.5)
    small_gain = _option((1.5, 1.5, 1.5), 2.0 / (MIN_GAIN - 0.1), 1.0)
    pick, why = choose_spacing([base, small_gain], BUDGET_S, MIN_SAMPLES_3D)
    assert pick == 0 and "kept the planned spacing" in why


def _large_image_setup(spacing=(0.625, 0.625, 0.625), shape=(88, 150, 190)):
    """A left-atrium-like dataset by default: 88x150x190 voxels at 0.625 mm."""
    ds = make_ds()
    fp = make_fp([spacing] * 6, [shape] * 6)
    options = PlannerOptions(device="cpu", time_budget_minutes=30)
    plan = plan_dataset(ds, fp, options, memory_estimator=reference_estimator)

    def plan_at(spacing):
        return plan_dataset(
            ds, fp, replace(options, target_spacing=spacing), memory_estimator=reference_estimator
        ).configuration("3d_fullres")

    return plan, plan_at


@pytest.mark.parametrize("worst, lever", [(0.99, True), (0.90, False)])
def test_fit_resolution_on_a_large_image(no_bf16, worst, lever):
    plan, plan_at = _large_image_setup()
    fitted = fit_plan_to_budget(plan, "cpu", 30, measure_fn=step_time)
    assert not fitted.notes["budget"]["chosen"]["converges"]
    asked = []

    def roundtrip(spacings):
        asked.extend(spacings)
        return [{"label1": 1.0 if i == 0 else worst, "label2": 1.0} for i, _ in enumerate(spacings)]

    out = fit_resolution(fitted, "cpu", 30, roundtrip=roundtrip, plan_at=plan_at, measure_fn=step_time)
    record = out.notes["budget"]["resolution"]
    assert asked == [(0.625,) * 3, (0.9375,) * 3, (1.25,) * 3]
    assert [o["admissible"] for o in record["options"]] == [True, lever, lever]
    if lever:
        assert out.default_configuration == COARSE_CONFIGURATION
        cfg = out.configuration(COARSE_CONFIGURATION)
        assert cfg.spacing == (1.25, 1.25, 1.25) and cfg.previous_stage is None
        assert out.notes["budget"]["configuration"] == COARSE_CONFIGURATION
        chosen = out.notes["budget"]["chosen"]
        assert chosen["samples"] >= MIN_GAIN * record["options"][0]["best"]["samples"]
        assert record["decision"].startswith(f"trains {COARSE_CONFIGURATION} at 1.25x1.25x1.25 mm")
        # the fit at the planned spacing is kept in the record; 3d_fullres keeps its fitted network
        assert record["planned_spacing_fit"]["chosen"] == fitted.notes["budget"]["chosen"]
        assert out.configuration("3d_fullres") == fitted.configuration("3d_fullres")
        out.validate()
    else:
        assert out.default_configuration == "3d_fullres"
        assert out.configurations == fitted.configurations
        assert "kept the planned spacing" in record["decision"]


def test_thick_slice_abdominal_mri_keeps_its_spacing(no_bf16):
    """CHAOS-like 256x256x36 at 1.25x1.25x7.7 mm: the coarser spacings' whole images cost more per step than
    the planned spacing's smallest patch, so they promise fewer samples (the measured A/B agrees)."""
    plan, plan_at = _large_image_setup((7.7, 1.25, 1.25), (36, 256, 256))
    fitted = fit_plan_to_budget(plan, "cpu", 30, measure_fn=step_time)
    out = fit_resolution(
        fitted, "cpu", 30, roundtrip=lambda sps: [{"label1": 0.99}] * len(sps), plan_at=plan_at, measure_fn=step_time
    )
    record = out.notes["budget"]["resolution"]
    assert out.configurations == fitted.configurations
    assert all(o["admissible"] for o in record["options"])
    base = record["options"][0]["best"]["samples"]
    assert all(o["best"]["samples"] < base for o in record["options"][1:])
    assert record["decision"].startswith("kept the planned spacing")


def test_a_converging_plan_keeps_its_spacing(no_bf16):
    fitted = fit_plan_to_budget(
        hippocampus_like_plan(), "cpu", 30, configuration="3d_fullres", measure_fn=lambda *a: 0.05
    )
    assert fitted.notes["budget"]["chosen"]["converges"]

    def never(*_):
        raise AssertionError("a converging plan needs no round trip or coarser plan")

    out = fit_resolution(fitted, "cpu", 30, roundtrip=never, plan_at=never)
    assert out.configurations == fitted.configurations
    assert out.notes["budget"]["resolution"]["decision"].endswith("converges")


def test_no_time_left_still_probes_the_coarser_spacing(no_bf16):
    plan, plan_at = _large_image_setup()
    fitted = fit_plan_to_budget(plan, "cpu", 30, measure_fn=step_time)
    calls = []

    def counting(net, *args):
        calls.append(tuple(net.patch_size))
        return step_time(net, *args)

    out = fit_resolution(
        fitted,
        "cpu",
        30,
        roundtrip=lambda sps: [{"label1": 0.99}] * len(sps),
        plan_at=plan_at,
        max_seconds=0.0,
        measure_fn=counting,
    )
    assert out.default_configuration == COARSE_CONFIGURATION
    assert len(calls) == 1  # one probe step of the cheapest candidate, not a choice from predictions alone
    rows = out.notes["budget"]["candidates"]
    assert sum(r["step_time_s"] is not None for r in rows) == 1
    assert out.notes["budget"]["resolution"]["measured_at_chosen"]["step_time_s"] is not None
