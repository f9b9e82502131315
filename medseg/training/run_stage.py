"""The stage a run trains: the run's settings applied to the planned network (:func:`run_plan`).

A run may override its plan: deep supervision switched off, another batch size, other mirrored axes. The
plan a run stores in its checkpoints and ``plans.json`` holds these overrides, so that prediction (mirror
TTA flips exactly the axes the network was trained to see flipped) rebuilds the network that was trained.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from medseg.errors import ConfigError
from medseg.planning.plan import ConfigurationPlan
from medseg.planning.stage import Stage
from medseg.training.config import AugmentationConfig, TrainConfig

__all__ = ["resolve_mirror_axes", "run_plan"]


def resolve_mirror_axes(aug: AugmentationConfig, cfg_plan: ConfigurationPlan) -> tuple[int, ...] | None:
    """Patch axes a run mirrors: ``aug.mirror_axes`` when set (checked against the patch), else the plan's.

    Raises:
        ConfigError: an axis outside the configuration's patch.
    """
    if aug.mirror_axes is None:
        return cfg_plan.mirror_axes
    axes = tuple(sorted(set(int(a) for a in aug.mirror_axes)))
    bad = [a for a in axes if not 0 <= a < cfg_plan.dims]
    if bad:
        raise ConfigError(
            f"augmentation.mirror_axes {list(aug.mirror_axes)}: axes {bad} are not axes of the "
            f"{cfg_plan.dims}D patch of configuration {cfg_plan.name!r} (0..{cfg_plan.dims - 1})"
        )
    return axes


def run_plan(stage: Stage, cfg: TrainConfig) -> Stage:
    """The stage a run actually trains: its plan is stored in every checkpoint.

    The run's own settings replace the planned ones: deep supervision switched off, another batch size,
    the mirrored axes (:func:`resolve_mirror_axes`; stored in the run's plan, so that mirror TTA at
    prediction flips exactly the axes the network was trained to see flipped).

    Returns:
        ``stage`` itself when the settings change nothing, else the stage of the changed plan.

    Raises:
        ConfigError: mirror axes outside the configuration's patch.
    """
    plan, cfg_plan, net = stage.plan, stage.configuration, stage.network
    changes: dict[str, Any] = {}
    if not cfg.deep_supervision and net.spec.deep_supervision:
        changes["spec"] = dataclasses.replace(net.spec, deep_supervision=False)
    if cfg.batch_size is not None and cfg.batch_size != net.batch_size:
        changes["batch_size"] = cfg.batch_size
    mirror_axes = resolve_mirror_axes(cfg.augmentation, cfg_plan)
    if changes or mirror_axes != cfg_plan.mirror_axes:
        net = dataclasses.replace(net, **changes)
        networks = dict(cfg_plan.networks)
        networks[stage.arch] = net
        cfg_plan = dataclasses.replace(cfg_plan, networks=networks, mirror_axes=mirror_axes)
        configs = dict(plan.configurations)
        configs[stage.config_name] = cfg_plan
        return Stage(dataclasses.replace(plan, configurations=configs), cfg_plan, net)
    return stage
