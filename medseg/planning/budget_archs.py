"""The time-budget fit across architectures: ``medseg plan --archs unet segresnet --time-budget M``.

Every architecture planned for the configuration is fitted on its own (:func:`medseg.planning.budget.fit_plan_to_budget`,
its own candidate grid and levers, an equal share of what is left of the time limit); the winners then meet under
the same choice rule (:func:`medseg.planning.budget_rules.choose_candidate`: among those that converge the largest
``base_features x patch voxels``, ties to more samples; when none converges the most samples per second), and the
winner's architecture becomes the configuration's default. Each architecture keeps its fitted network in the plan
(``medseg train --arch`` trains any of them); ``notes["budget"]`` is the winner's record plus ``architectures``
(each one's chosen candidate and reasoning) and ``architecture_choice``. Times in seconds.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from medseg.planning import budget
from medseg.planning.budget_rules import Measured, choose_candidate
from medseg.planning.candidates import Candidate
from medseg.planning.fit_clock import now
from medseg.planning.plan import Plan

logger = logging.getLogger(__name__)


def fit_archs_to_budget(
    plan: Plan,
    device: str,
    minutes: float,
    *,
    configuration: str | None = None,
    max_seconds: float | None = None,
    **fit_kwargs: Any,
) -> Plan:
    """Fit every architecture of ``configuration`` to the budget and make the best one its default.

    Args:
        plan: a validated plan.
        device, minutes: as for :func:`~medseg.planning.budget.fit_plan_to_budget`.
        configuration: the configuration to fit (default: the plan's default configuration).
        max_seconds: time limit of the whole fit (None: no limit), shared equally by what is left per architecture.
        fit_kwargs: passed on to :func:`~medseg.planning.budget.fit_plan_to_budget` (``measure_fn``, ``measure_steps``,
            ``seed``).

    Returns:
        The fitted plan (exactly :func:`fit_plan_to_budget`'s with one architecture).

    Raises:
        PlanError: as :func:`fit_plan_to_budget`.
    """
    cfg_name = configuration or plan.default_configuration
    cfg = plan.configuration(cfg_name)
    archs = [cfg.default_arch] + [a for a in cfg.networks if a != cfg.default_arch]
    t0 = now()
    fitted, records = plan, {}
    for i, arch in enumerate(archs):
        left = None if max_seconds is None else max(0.0, (max_seconds - (now() - t0)) / (len(archs) - i))
        fitted = budget.fit_plan_to_budget(  # through the module: tests replace the measurement there
            fitted, device, minutes, configuration=cfg_name, arch=arch, max_seconds=left, **fit_kwargs
        )
        records[arch] = fitted.notes["budget"]
    if len(archs) == 1:
        return fitted
    winners = [_measured(records[a]["chosen"]) for a in archs]
    best, reasoning = choose_candidate(winners, float(minutes) * 60.0, cfg.dims)
    arch = archs[best]
    names = ", ".join(f"{a} = {w.candidate.label}" for a, w in zip(archs, winners))
    why = f"architectures' fitted candidates: {names}. {arch} wins: {reasoning}"
    logger.info("budget fit across architectures: %s", why)
    notes = {
        **records[arch],
        "architectures": {
            a: {
                "chosen": records[a]["chosen"],
                "reasoning": records[a]["reasoning"],
                "seconds": records[a]["measure_seconds"],
            }
            for a in archs
        },
        "architecture_choice": why,
        "measure_seconds": round(now() - t0, 2),
    }
    new_cfg = replace(fitted.configuration(cfg_name), default_arch=arch)
    return replace(
        fitted, configurations={**fitted.configurations, cfg_name: new_cfg}, notes={**fitted.notes, "budget": notes}
    ).validate()


def _measured(chosen: dict[str, Any]) -> Measured:
    """The choice rule's view of one architecture's recorded winner."""
    c = Candidate(chosen["base_features"], chosen["max_features"], tuple(chosen["patch_size"]), chosen["batch_size"])
    return Measured(c, chosen.get("step_time_s"), "measured", chosen.get("patch_coverage", 1.0))


__all__ = ["fit_archs_to_budget"]
