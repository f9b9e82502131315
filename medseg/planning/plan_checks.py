"""Cross-field checks of a plan: a cascade's previous stage, and region-based training's regions.

:meth:`medseg.planning.plan.Plan.check` collects these messages with its own; they take the fields they
read (not the plan classes), so this module does not import :mod:`medseg.planning.plan`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = ["previous_stage_problems", "region_problems"]


class Stage(Protocol):
    """What the previous-stage check reads of a configuration (:class:`~medseg.planning.plan.ConfigurationPlan`)."""

    @property
    def name(self) -> str: ...

    @property
    def dims(self) -> int: ...

    @property
    def previous_stage(self) -> str | None: ...


def previous_stage_problems(cfg: Stage, configurations: Mapping[str, Stage]) -> list[str]:
    """Inconsistencies of a cascade's ``previous_stage`` (another 3D configuration of the plan, no chain).

    Args:
        cfg: the configuration checked.
        configurations: every configuration of the plan, by name.

    Returns:
        One message per problem (empty when ``cfg`` is no cascade or a consistent one).
    """
    prev = cfg.previous_stage
    if prev is None:
        return []
    where = f"configurations.{cfg.name}.previous_stage"
    if prev == cfg.name or prev not in configurations:
        return [
            f"{where} {prev!r} must name another configuration of the plan ({sorted(set(configurations) - {cfg.name})})"
        ]
    other = configurations[prev]
    problems = []
    if cfg.dims != 3 or other.dims != 3:
        problems.append(f"{where}: a cascade needs a 3D configuration and a 3D previous stage")
    if other.previous_stage is not None:
        problems.append(f"{where} {prev!r} is itself a cascade; cascades of more than two stages are not supported")
    return problems


def region_problems(
    label_ids: Sequence[int], regions: Sequence[Sequence[int]] | None, order: Sequence[int] | None
) -> list[str]:
    """Inconsistencies of a plan's ``regions`` / ``regions_class_order``.

    Args:
        label_ids: the plan's original label ids, background 0 first.
        regions: per region the label ids it holds, or None (no region-based training).
        order: the label id written for each region, or None.

    Returns:
        One message per problem (empty when consistent or both None).
    """
    if regions is None and order is None:
        return []
    if not regions or order is None:
        return [
            "regions and regions_class_order must be given together (region-based plans), "
            f"got {regions!r} and {order!r}"
        ]
    problems = []
    ids = set(int(v) for v in label_ids)
    if len(order) != len(regions):
        problems.append(f"regions_class_order has {len(order)} entries but there are {len(regions)} regions")
    for r, reg in enumerate(regions):
        if not reg or not set(reg) <= ids - {0}:
            problems.append(
                f"regions[{r}] = {list(reg)} must be a non-empty list of nonzero ids of label_ids {sorted(ids)}"
            )
    if not set(order) <= ids - {0}:
        problems.append(f"regions_class_order {list(order)} must hold nonzero ids of label_ids {sorted(ids)}")
    return problems
