"""The distillation settings of a run (``TrainConfig.distill``, ``medseg train --distill-from``); what they do is
:mod:`medseg.training.distillation`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DistillConfig"]


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings of a run (``TrainConfig.distill``).

    Attributes:
        teachers: the teachers' run folders (absolute paths).
        weight: weight of the KL term beside Dice + CE.
        temperature: softmax temperature ``T`` (> 0) of teacher and student in the KL term.
        checkpoint: the teachers' checkpoint (``final``, ``best`` or ``snapshots``).
    """

    teachers: tuple[str, ...] = ()
    weight: float = 1.0
    temperature: float = 2.0
    checkpoint: str = "final"

    def check(self) -> list[str]:
        """Every invalid value, one message each."""
        p = []
        if not self.teachers:
            p.append("distill.teachers must name at least one run folder")
        if self.weight < 0 or self.temperature <= 0:
            p.append(f"distill.weight must be >= 0 and distill.temperature > 0: {self.weight}, {self.temperature}")
        return p
