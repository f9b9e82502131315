"""`train --time-budget` on a plan not fitted to it: the refit decision, the refit itself (only the network
changes, the cache stays valid), --keep-plan, and the validation reserve of a budget."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from medseg.planning.plan import Plan
from medseg.planning.stage import Stage
from medseg.training import TrainConfig, load_checkpoint, train
from medseg.training.budget_refit import fit_run_to_budget, refit_reason

QUICK = dict(iters_per_epoch=5, val_iters=1, num_workers=0, num_threads=1, precision="fp32", seed=3)


def _fitted(plan: Plan, minutes=4.0, device="cpu", configuration="3d_fullres", arch="unet") -> Plan:
    notes = {
        **plan.notes,
        "budget": {"configuration": configuration, "arch": arch, "device": device, "minutes": minutes},
    }
    return dataclasses.replace(plan, time_budget_minutes=minutes, device=device, notes=notes)


def test_refit_decision(tiny_work):
    plan = Plan.load(tiny_work / "plans.json")
    stage = Stage.resolve(plan, "3d_fullres", "unet")
    assert refit_reason(stage, "cpu", 4.0) == "the plan is not fitted to a time budget"
    fitted = _fitted(plan)
    assert refit_reason(Stage.resolve(fitted, "3d_fullres", "unet"), "cpu", 4.0) is None
    assert refit_reason(Stage.resolve(fitted, "3d_fullres", "unet"), "cpu", 4.3) is None  # within 10 %
    assert "fitted for a 4-minute budget, this run has 10 minutes" in refit_reason(
        Stage.resolve(fitted, "3d_fullres", "unet"), "cpu", 10.0
    )
    assert "fitted on cuda, this run trains on cpu" in refit_reason(
        Stage.resolve(_fitted(plan, device="cuda"), "3d_fullres", "unet"), "cpu", 4.0
    )
    assert "is for 3d_fullres/unet, not 2d/unet" in refit_reason(Stage.resolve(fitted, "2d", "unet"), "cpu", 4.0)


def test_keep_plan_and_several_processes_train_the_plan_as_it_is(tiny_work):
    plan = Plan.load(tiny_work / "plans.json")
    cfg = TrainConfig(time_budget_minutes=4.0, keep_plan=True, configuration="3d_fullres", arch="unet")
    same, kept = fit_run_to_budget(Stage.resolve(plan, "3d_fullres", "unet"), cfg)
    assert same.plan is plan and kept["refit"] is False and kept["kept_by"] == "--keep-plan"
    same, kept = fit_run_to_budget(
        Stage.resolve(plan, "3d_fullres", "unet"), dataclasses.replace(cfg, keep_plan=False), distributed=True
    )
    assert same.plan is plan and "several processes" in kept["kept_by"]
    fitted = _fitted(plan)
    stage = Stage.resolve(fitted, "3d_fullres", "unet")
    assert fit_run_to_budget(stage, cfg) == (stage, None)


def test_a_real_refit_changes_only_the_network(tiny_work):
    plan = Plan.load(tiny_work / "plans.json")
    cfg = TrainConfig(time_budget_minutes=0.3, configuration="3d_fullres", arch="unet")
    new_stage, rec = fit_run_to_budget(Stage.resolve(plan, "3d_fullres", "unet"), cfg)
    new = new_stage.plan
    # the probe always runs, and the first step of a process also sets its kernels up: a few seconds over
    assert rec["refit"] is True and rec["fit_seconds"] <= rec["fit_limit_seconds"] + 10.0
    assert rec["from"]["base_features"] == 4 and rec["to"]["base_features"] in (16, 24, 32)
    assert (new.time_budget_minutes, new.device) == (0.3, "cpu") and "budget" in new.notes
    a, b = plan.to_dict(), new.to_dict()
    configs_a, configs_b = a.pop("configurations"), b.pop("configurations")
    for name in ("time_budget_minutes", "notes", "device"):
        a.pop(name), b.pop(name)
    assert a == b  # dataset, labels, channels, default configuration: unchanged
    for name, ca in configs_a.items():
        cb = configs_b[name]
        changed = {k for k in ca if ca[k] != cb[k]}
        assert changed <= {"networks", "patch_size", "batch_size"}, changed  # spacing, normalisation: the cache
        if name != "3d_fullres":
            assert not changed


def test_train_records_the_refit_and_leaves_the_work_plan_alone(tiny_work, monkeypatch):
    from medseg.training import budget_refit

    before = (tiny_work / "plans.json").read_text()
    calls = []

    def fake_fit(plan, device, minutes, *, configuration=None, arch=None, max_seconds=None, **kw):
        calls.append((device, minutes, configuration, arch, max_seconds))
        cfg = plan.configuration(configuration)
        net = cfg.network(arch)
        net = dataclasses.replace(net, spec=dataclasses.replace(net.spec, base_features=8, max_features=32))
        new = dataclasses.replace(cfg, networks={**cfg.networks, arch: net})
        notes = {
            **plan.notes,
            "budget": {
                "configuration": configuration,
                "arch": arch,
                "device": device,
                "minutes": minutes,
                "chosen": {"step_time_s": 0.01, "iterations": 9},
            },
        }
        return dataclasses.replace(
            plan,
            configurations={**plan.configurations, configuration: new},
            notes=notes,
            time_budget_minutes=minutes,
            device=device,
        ).validate()

    monkeypatch.setattr(budget_refit, "fit_plan_to_budget", fake_fit)
    run = train(tiny_work, TrainConfig(time_budget_minutes=0.1, fold="all", **QUICK))
    assert calls == [("cpu", 0.1, "3d_fullres", "unet", pytest.approx(0.6))]
    rec = json.loads((run / "run_record.json").read_text())["budget_fit"]
    assert rec["refit"] is True and rec["to"]["base_features"] == 8 and rec["from"]["base_features"] == 4
    assert Plan.load(run / "plans.json").configuration("3d_fullres").network().spec.base_features == 8
    assert (
        load_checkpoint(run / "checkpoint_final.pt")["plan"]["configurations"]["3d_fullres"]["networks"]["unet"][
            "spec"
        ]["base_features"]
        == 8
    )
    assert (tiny_work / "plans.json").read_text() == before


def test_keep_plan_warns_once_with_the_iterations_to_expect(tiny_work, caplog):
    with caplog.at_level(logging.WARNING, logger="medseg"):
        run = train(tiny_work, TrainConfig(time_budget_minutes=0.1, fold="all", keep_plan=True, **QUICK))
    warnings = [r.getMessage() for r in caplog.records if "iterations fit in the 0.1-minute budget" in r.getMessage()]
    assert len(warnings) == 1 and "not fitted to a time budget (kept: --keep-plan)" in warnings[0]
    assert json.loads((run / "run_record.json").read_text())["budget_fit"]["refit"] is False


def test_a_validation_too_long_for_the_budget_is_shortened_not_overrun(tiny_work, monkeypatch):
    from medseg.training import trainer

    # pretend one patch forward takes 2 s: the full validation (2 cases x 8 TTA passes) would take minutes
    monkeypatch.setattr(trainer, "measure_forward_seconds", lambda *a, **k: 2.0)
    # ... and keep it so: the run would otherwise correct the estimate from its real (fast) steps
    monkeypatch.setattr(trainer.Trainer, "_seconds_per_window", lambda self: 2.0)
    budget_min = 0.2
    run = train(tiny_work, TrainConfig(time_budget_minutes=budget_min, keep_plan=True, **QUICK))
    ckpt = load_checkpoint(run / "checkpoint_final.pt")
    assert ckpt["iteration"] > 0
    metrics = json.loads((run / "validation" / "metrics.json").read_text())
    rec = metrics["time_budget"]
    assert rec["shortened"] and rec["estimated_full_seconds"] > 0.25 * budget_min * 60
    assert rec["note"] and set(rec["skipped_cases"]) | set(rec["tta_passes"]) == set(
        json.loads((tiny_work / "splits.json").read_text())[0]["val"]
    )
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "finished" and progress["elapsed_seconds"] <= budget_min * 60 * 1.05 + 1.0
