"""Planning: the :class:`Plan` dataclasses, the network topology rule and :func:`plan_dataset`."""

from __future__ import annotations

from medseg.planning.plan import ConfigurationPlan, NetworkPlan, NormalizationSpec, Plan
from medseg.planning.planner import PlannerOptions, plan_dataset
from medseg.planning.topology import Topology, compute_topology

__all__ = [
    "ConfigurationPlan",
    "NetworkPlan",
    "NormalizationSpec",
    "Plan",
    "PlannerOptions",
    "Topology",
    "compute_topology",
    "plan_dataset",
]
