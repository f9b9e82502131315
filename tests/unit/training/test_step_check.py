"""The run's own first steps against the budget fit's step time."""

from __future__ import annotations

import logging
from dataclasses import replace

from medseg.planning.stage import Stage
from medseg.training.step_check import STEPS, TOLERANCE, WARMUP, StepTimeCheck


def test_decides_after_warmup_and_steps_and_flags_a_slow_fit(caplog):
    check = StepTimeCheck(3.2)
    with caplog.at_level(logging.WARNING):
        for _ in range(WARMUP):
            check.add(10.0)  # warm-up steps do not count
        for _ in range(STEPS - 1):
            check.add(1.2)
        assert check.record() is None
        check.add(1.2)
    rec = check.record()
    assert rec["off"] and rec["ratio"] == round(1.2 / 3.2, 3) and rec["run_step_seconds"] == 1.2
    assert "busy machine" in caplog.text
    check.add(100.0)  # decided once
    assert check.record() == rec


def test_within_tolerance_is_not_off():
    check = StepTimeCheck(1.0)
    for _ in range(WARMUP + STEPS):
        check.add(TOLERANCE * 0.95)
    assert not check.record()["off"]


def test_only_for_the_fitted_network():
    from tests.unit.planning.conftest import hippocampus_like_plan

    plan = hippocampus_like_plan()
    net = plan.configuration("3d_fullres").network("unet")
    chosen = {
        "base_features": net.spec.base_features,
        "patch_size": list(net.patch_size),
        "batch_size": net.batch_size,
        "step_time_s": 0.5,
    }
    fitted = replace(
        plan, notes={**plan.notes, "budget": {"configuration": "3d_fullres", "arch": "unet", "chosen": chosen}}
    )
    assert StepTimeCheck.for_run(Stage(fitted, fitted.configuration("3d_fullres"), net)).fitted_seconds == 0.5
    assert StepTimeCheck.for_run(Stage(fitted, fitted.configuration("2d"), net)) is None
    bigger = replace(net, batch_size=net.batch_size + 1)
    assert StepTimeCheck.for_run(Stage(fitted, fitted.configuration("3d_fullres"), bigger)) is None
    assert StepTimeCheck.for_run(Stage(plan, plan.configuration("3d_fullres"), net)) is None
