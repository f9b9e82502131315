"""Fit a run's plan to its time budget: ``medseg train --time-budget M`` on a plan not fitted to it.

A plan counts as fitted to a run when its time-budget fit (``plan.notes["budget"]``, written by
:func:`medseg.planning.budget.fit_plan_to_budget`) is for the run's configuration and architecture, was
measured on the run's kind of device (``cpu``/``cuda``), and for a budget within
:data:`BUDGET_TOLERANCE` of the run's (:func:`refit_reason`). Otherwise the run refits it
(:func:`fit_run_to_budget`) with the same fit ``medseg plan --time-budget`` runs, limited to
:func:`~medseg.planning.budget.fit_seconds_limit` of the budget, whose time the run then has less for
training. The fit changes only the width, patch, batch and precision of the network (never spacing,
normalisation or the data identifier), so the preprocessed cache stays valid; the run's ``plans.json``
holds the refitted plan with the fit's measurements, its run record the ``budget_fit`` record, and
``WORK/plans.json`` is left as it was.

With ``keep_plan`` (``--keep-plan``), with pretrained weights (``--pretrained``: they need the plan's
network), or where a refit cannot run (several processes under ``torchrun``), the plan is trained as it
is and the trainer warns, after its first measured step, how many iterations that leaves.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from medseg.errors import PlanError
from medseg.planning.budget import fit_plan_to_budget, fit_seconds_limit
from medseg.planning.plan import Plan
from medseg.planning.stage import Stage
from medseg.training.config import TrainConfig

logger = logging.getLogger(__name__)

#: A plan fitted for a budget within this fraction of the run's budget counts as fitted to it.
BUDGET_TOLERANCE = 0.1


def refit_reason(stage: Stage, device_type: str, minutes: float) -> str | None:
    """Why the stage's plan is not fitted to a run of ``minutes`` on ``device_type``, or None when it is.

    Args:
        stage: what the run trains, in the work folder's plan.
        device_type: ``cpu`` or ``cuda``.
        minutes: the run's time budget.
    """
    plan, configuration, arch = stage.plan, stage.config_name, stage.arch
    notes = plan.notes.get("budget") if isinstance(plan.notes, dict) else None
    if plan.time_budget_minutes is None or not isinstance(notes, dict):
        return "the plan is not fitted to a time budget"
    fitted_cfg = notes.get("configuration")
    fitted_arch = notes.get("arch", stage.configuration.default_arch)
    if fitted_cfg != configuration or fitted_arch != arch:
        return f"the plan's budget fit is for {fitted_cfg}/{fitted_arch}, not {configuration}/{arch}"
    fitted_on = str(notes.get("device", plan.device)).split(":")[0]
    if fitted_on != device_type:
        return f"the plan was fitted on {fitted_on}, this run trains on {device_type}"
    fitted_minutes = float(notes.get("minutes", plan.time_budget_minutes))
    if abs(fitted_minutes - minutes) > BUDGET_TOLERANCE * minutes:
        return f"the plan was fitted for a {fitted_minutes:g}-minute budget, this run has {minutes:g} minutes"
    return None


def _label(d: dict[str, Any]) -> str:
    return f"{d['base_features']}f {'x'.join(map(str, d['patch_size']))} b{d['batch_size']} {d['precision']}"


def _check_same_preprocessing(old: Plan, new: Plan, configuration: str) -> None:
    a, b = old.configuration(configuration), new.configuration(configuration)
    if (a.spacing, a.normalization, a.data_identifier) != (b.spacing, b.normalization, b.data_identifier):
        raise PlanError(f"the budget refit changed the preprocessing of {configuration}; this is a bug")


def fit_run_to_budget(
    stage: Stage, cfg: TrainConfig, *, distributed: bool = False
) -> tuple[Stage, dict[str, Any] | None]:
    """The stage a time-budgeted run trains, and its ``budget_fit`` record (see the module docstring).

    Args:
        stage: what the run trains, in the work folder's plan.
        cfg: the run's resolved settings (``time_budget_minutes`` set).
        distributed: several processes train together (each would measure alone: no refit).

    Returns:
        ``(stage, budget_fit)``: the stage unchanged and None when its plan is fitted to the run; else the
        stage of the refitted plan (or the stage as it is, with ``keep_plan``) and the record of what was done
        (:attr:`medseg.training.run_record.RunRecord.budget_fit`).

    Raises:
        PlanError: the fit failed (e.g. no candidate could be measured).
    """
    plan, configuration, arch = stage.plan, stage.config_name, stage.arch
    minutes = cfg.time_budget_minutes
    assert minutes is not None
    device_type = cfg.device.split(":")[0]
    reason = refit_reason(stage, device_type, minutes)
    if reason is None:
        return stage, None
    before = stage.network.summary()
    if cfg.keep_plan or distributed or cfg.pretrained is not None:
        if cfg.pretrained is not None:
            kept_by = "--pretrained: a refit could change the network's width, and the pretrained weights would not fit"
        else:
            kept_by = "--keep-plan" if cfg.keep_plan else "a run of several processes (each would measure alone)"
        record = {"refit": False, "reason": reason, "kept_by": kept_by, "network": before}
        logger.info("%s; training it as it is (%s)", reason, kept_by)
        return stage, record
    limit = fit_seconds_limit(minutes)
    logger.info(
        "%s: refitting %s/%s (%s) to the %g-minute budget on %s, measuring for at most %.0f s",
        reason,
        configuration,
        arch,
        _label(before),
        minutes,
        device_type,
        limit,
    )
    t = time.perf_counter()
    new_plan = fit_plan_to_budget(plan, device_type, minutes, configuration=configuration, arch=arch, max_seconds=limit)
    seconds = time.perf_counter() - t
    _check_same_preprocessing(plan, new_plan, configuration)
    new_stage = stage.with_plan(new_plan)
    after = new_stage.network.summary()
    chosen = new_plan.notes["budget"]["chosen"]
    record = {
        "refit": True,
        "reason": reason,
        "minutes": float(minutes),
        "device": device_type,
        "from": before,
        "to": {**after, "channels_last": chosen.get("channels_last")},
        "step_time_s": chosen.get("step_time_s"),
        "predicted_iterations": chosen.get("iterations"),
        "fit_seconds": round(seconds, 2),
        "fit_limit_seconds": round(limit, 2),
    }
    logger.info(
        "refitted %s/%s to the %g-minute budget in %.1f s: %s -> %s (%s s per step, ~%s iterations "
        "predicted; the run's plans.json has the fit's measurements)",
        configuration,
        arch,
        minutes,
        seconds,
        _label(before),
        _label(after),
        chosen.get("step_time_s"),
        chosen.get("iterations"),
    )
    return new_stage, record


__all__ = ["BUDGET_TOLERANCE", "fit_run_to_budget", "refit_reason"]
