"""The budget fit's own time limit: probe first, measure only what fits, never choose an unmeasured candidate."""

from __future__ import annotations

import math

import pytest

from medseg.planning import fit_clock, levers, step_timing
from medseg.planning.budget import fit_plan_to_budget, fit_seconds_limit, scaled_step_time
from medseg.planning.candidates import Candidate

from .conftest import hippocampus_like_plan


class VirtualClock:
    """Step time linear in features x voxels x batch; every measurement advances a virtual clock by its
    warm-up and timed steps, which the fit's time limit reads."""

    def __init__(self, per_unit: float = 1e-6, overhead: float = 0.5) -> None:
        self.now, self.per_unit, self.overhead = 0.0, per_unit, overhead
        self.calls: list[tuple[int, tuple[int, ...], int, str, bool, int]] = []

    def __call__(self, net, cin, k, device, precision, channels_last, steps):
        t = self.overhead + self.per_unit * net.spec.base_features * math.prod(net.patch_size) * net.batch_size
        t *= 0.9 if channels_last else 1.0
        self.now += (step_timing.WARMUP_STEPS + steps) * t
        self.calls.append(
            (net.spec.base_features, tuple(net.patch_size), net.batch_size, precision, channels_last, steps)
        )
        return t


@pytest.fixture
def virtual(monkeypatch):
    monkeypatch.setattr(levers, "cpu_bf16_supported", lambda: False)
    clock = VirtualClock()
    monkeypatch.setattr(fit_clock, "_clock", lambda: clock.now)
    return clock


def _fit(clock, limit, minutes=10.0):
    return fit_plan_to_budget(
        hippocampus_like_plan(), "cpu", minutes, configuration="3d_fullres", measure_fn=clock, max_seconds=limit
    )


def test_the_limit_is_a_tenth_of_the_budget():
    assert fit_seconds_limit(4) == pytest.approx(24.0) and fit_seconds_limit(30) == pytest.approx(180.0)


def test_scaled_step_time_errs_on_the_slow_side():
    small, wide = Candidate(16, 160, (8, 8, 8), 2), Candidate(32, 320, (8, 8, 16), 4)
    assert scaled_step_time(1.0, small, wide) == pytest.approx(4 * 2 * 2)  # width squared, voxels, batch
    assert scaled_step_time(16.0, wide, small) == pytest.approx(16.0 / 2 / 2 / 2)  # width linear downwards


def test_a_limited_fit_stays_inside_its_limit_and_chooses_a_measured_candidate(virtual):
    plan = _fit(virtual, 60.0, minutes=600.0)  # every candidate converges: only the limit stops measuring
    notes = plan.notes["budget"]
    assert virtual.now <= 60.0 and notes["time_limit_seconds"] == 60.0
    first = virtual.calls[0]
    assert first[:3] == (16, (40, 56, 40), 2) and first[4] is True and first[5] == 1  # the probe, CPU defaults
    statuses = [r["status"] for r in notes["candidates"]]
    assert any(s.startswith("not measured") for s in statuses)
    chosen = notes["chosen"]
    row = next(
        r
        for r in notes["candidates"]
        if r["base_features"] == chosen["base_features"]
        and r["batch_size"] == chosen["batch_size"]
        and r["patch_size"] == chosen["patch_size"]
    )
    assert row["status"].startswith("measured") and row["step_time_s"] is not None
    assert "probe" in notes["levers"]


def test_without_room_for_the_levers_the_probe_decides_at_the_default_setting(virtual):
    plan = _fit(virtual, 0.0)
    notes = plan.notes["budget"]
    assert len(virtual.calls) == 1  # only the probe ran
    assert "Levers not measured" in notes["reasoning"]
    assert (notes["chosen"]["base_features"], notes["chosen"]["batch_size"]) == (16, 2)
    assert notes["levers"]["chosen"] == {"precision": "fp32", "channels_last": True}
    net = plan.configuration("3d_fullres").network("unet")
    assert net.precision == "fp32" and net.spec.base_features == 16


def test_no_limit_measures_as_before(virtual):
    _fit(virtual, None)
    assert all(steps == 3 for *_, steps in virtual.calls)
    assert virtual.calls[0][0] == 32  # the levers on the widest candidate first, no probe


def test_only_the_fitted_architecture_changes(virtual):
    before = hippocampus_like_plan()
    plan = fit_plan_to_budget(
        before, "cpu", 10.0, configuration="3d_fullres", arch="deeplab", measure_fn=virtual, max_seconds=60.0
    )
    cfg, old = plan.configuration("3d_fullres"), before.configuration("3d_fullres")
    assert cfg.network("unet") == old.network("unet") and cfg.patch_size == old.patch_size
    assert cfg.network("deeplab").spec.base_features in (16, 24, 32) and plan.notes["budget"]["arch"] == "deeplab"
    assert (cfg.spacing, cfg.normalization, cfg.data_identifier) == (
        old.spacing,
        old.normalization,
        old.data_identifier,
    )
