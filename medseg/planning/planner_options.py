"""PlannerOptions: what a plan is sized for (memory, device, architectures, precision, time budget).

Its own module so that the planner and the patch/batch fitting (:mod:`medseg.planning.memory_fitting`),
which the planner calls, can both read it without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medseg.errors import PlanError
from medseg.options import PRECISIONS, DeviceKind, Precision, choices, valid_values

__all__ = ["PlannerOptions"]


@dataclass(frozen=True)
class PlannerOptions:
    """What the plan is sized for.

    Attributes:
        gpu_memory_gb: memory one training step may use (GB) on the training device.
        archs: architectures to plan (registry names); the first is the default unless ``unet`` is among them.
        device: device the plan is sized for (``cuda`` or ``cpu``), recorded in the plan.
        time_budget_minutes: training time budget recorded in the plan (None = full schedule).
        precision: training precision the memory is estimated for (``fp32``, ``bf16``, ``fp16``).
        base_features: channels of the first stage.
        max_features: cap on channels per stage; None = 320 for 3D, 512 for 2D.
        max_poolings: cap on poolings per axis; None = limited only by the minimum feature map size (4).
        target_spacing: ``(Z, Y, X)`` spacing in mm that replaces the spacing rule's (3D datasets; the
            time-budget fit plans coarser spacings with it); None = the rule's.
    """

    gpu_memory_gb: float = 8.0
    archs: tuple[str, ...] = ("unet",)
    device: str = DeviceKind.CUDA
    time_budget_minutes: float | None = None
    precision: str = Precision.FP32
    base_features: int = 32
    max_features: int | None = None
    max_poolings: int | None = None
    target_spacing: tuple[float, ...] | None = None

    def check(self) -> None:
        problems = []
        if not (self.gpu_memory_gb > 0 and math.isfinite(self.gpu_memory_gb)):
            problems.append(f"gpu_memory_gb must be a positive number, got {self.gpu_memory_gb}")
        if not self.archs:
            problems.append("archs must name at least one architecture")
        if len(set(self.archs)) != len(self.archs):
            problems.append(f"archs has duplicates: {list(self.archs)}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.device not in choices(DeviceKind):
            problems.append(f"device must be {valid_values(DeviceKind)}, got {self.device!r}")
        if self.base_features < 1 or (self.max_features is not None and self.max_features < self.base_features):
            problems.append("need 1 <= base_features <= max_features")
        if self.time_budget_minutes is not None and not self.time_budget_minutes > 0:
            problems.append(f"time_budget_minutes must be positive, got {self.time_budget_minutes}")
        if self.target_spacing is not None and (
            len(self.target_spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in self.target_spacing)
        ):
            problems.append(f"target_spacing must be three positive spacings (Z, Y, X), got {self.target_spacing}")
        if problems:
            raise PlanError("invalid planner options: " + "; ".join(problems))
