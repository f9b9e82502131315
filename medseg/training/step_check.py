"""Check the budget fit's step time against the run's own first training steps.

The time-budget fit (:mod:`medseg.planning.budget`) chose the network from a few timed steps; a machine that
was busy while it measured (or is busy now) makes that choice rest on the wrong number. After
:data:`WARMUP` + :data:`STEPS` training steps the run compares the median of its own steps with the fit's
step time for the same network, patch and batch, logs a warning when they differ by more than
:data:`TOLERANCE` x either way, and records the comparison in ``progress.json`` (``step_time_check``). The
run is not refitted: a plan changed mid-run would change its network; re-run ``medseg plan`` (or train with
``--time-budget`` on a quiet machine) to refit.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

from medseg.planning.stage import Stage

logger = logging.getLogger(__name__)

#: First training steps left out of the comparison (allocation, kernel selection, thread tuning).
WARMUP = 3
#: Training steps whose median is compared.
STEPS = 10
#: Ratio of run to fit step time (or its inverse) above which the fit is reported as off.
TOLERANCE = 1.5


@dataclass
class StepTimeCheck:
    """The fit's step time of a run's network and the run's own first step times."""

    fitted_seconds: float
    steps: list[float] = field(default_factory=list)
    result: dict[str, Any] | None = None

    @classmethod
    def for_run(cls, stage: Stage) -> StepTimeCheck | None:
        """The check of a run training ``stage`` (its run plan), or None when the plan's budget fit did not
        time this network."""
        plan, configuration, arch, net = stage.plan, stage.config_name, stage.arch, stage.network
        notes = plan.notes.get("budget") if isinstance(plan.notes, dict) else None
        if (
            not isinstance(notes, dict)
            or notes.get("configuration") != configuration
            or notes.get("arch", arch) != arch
        ):
            return None
        chosen = notes.get("chosen") or {}
        same = (
            chosen.get("base_features") == net.spec.base_features
            and chosen.get("batch_size") == net.batch_size
            and list(chosen.get("patch_size") or []) == list(net.patch_size)
        )
        t = chosen.get("step_time_s")
        return cls(float(t)) if same and isinstance(t, (int, float)) and t > 0 else None

    def add(self, seconds: float) -> None:
        """Record one training step's wall time; decide once enough steps are in."""
        if self.result is not None:
            return
        self.steps.append(float(seconds))
        if len(self.steps) < WARMUP + STEPS:
            return
        run = statistics.median(self.steps[WARMUP:])
        ratio = run / self.fitted_seconds
        off = ratio > TOLERANCE or ratio < 1.0 / TOLERANCE
        self.result = {
            "fitted_step_seconds": round(self.fitted_seconds, 4),
            "run_step_seconds": round(run, 4),
            "ratio": round(ratio, 3),
            "steps": STEPS,
            "off": off,
        }
        if off:
            logger.warning(
                "the budget fit timed this network at %.2f s per step, but its first %d training steps took %.2f s "
                "(%.1fx): the fit %s; re-run `medseg plan` on a quiet machine to refit",
                self.fitted_seconds,
                STEPS,
                run,
                ratio,
                "measured on a busy machine, so it chose a smaller network than the budget allows"
                if ratio < 1
                else "was too optimistic (or this machine is busy now), so fewer iterations will fit",
            )
        else:
            logger.info(
                "step time check: %.2f s per step in training, %.2f s in the budget fit (%.2fx)",
                run,
                self.fitted_seconds,
                ratio,
            )

    def record(self) -> dict[str, Any] | None:
        return self.result


__all__ = ["STEPS", "TOLERANCE", "WARMUP", "StepTimeCheck"]
