"""The record of a folder prediction, ``OUT/prediction_record.json``: what every case used and took.

``medseg predict`` writes it always (atomically; the entries of earlier runs into the same folder are kept,
:func:`read_record_cases`): the per-case time budget and where it came from, the order of reductions a budget
goes through (:func:`~medseg.inference.time_budget.reduction_order`), and per case a :class:`CaseRecord`: the
TTA passes and window overlap used and the full ones, the estimated and measured seconds of each stage
(reading and preprocessing, the window measurement, the network, export), whether the budget held, and the
case's memory plan (RAM budget, estimated peak, streamed or not; :mod:`medseg.inference.memory_plan`). The
settings themselves are chosen by :class:`~medseg.inference.time_budget.CaseBudget`. Times are in seconds. A shard
of a split prediction writes its part, ``prediction_record.part-K-of-N.json``, merged later
(:func:`merge_record_parts`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medseg.inference.shards import merge_parts
from medseg.io.image import atomic_write_text

#: Name of the per-case record ``medseg predict`` writes into its output folder.
RECORD_NAME = "prediction_record.json"


@dataclass
class CaseRecord:
    """What one case of a folder prediction used and took (one entry of ``prediction_record.json``).

    Attributes:
        tta_passes / overlap: the setting used (TTA passes per window at most, window overlap).
        full_tta_passes / full_overlap: the setting without a budget.
        budget_seconds: the case's budget (None = no limit).
        estimated_seconds: estimate of the case under the setting used (None without a budget).
        seconds: measured, the sum of ``load_seconds``, ``measure_seconds``, ``network_seconds`` and
            ``write_seconds``.
        held: whether ``seconds`` stayed within the budget (None without a budget).
        memory: the case's memory plan (:meth:`~medseg.inference.memory_plan.MemoryPlan.to_dict`: the RAM
            budget, the estimated peak, whether the case was streamed); None when not planned.
    """

    tta_passes: int
    overlap: float
    full_tta_passes: int
    full_overlap: float
    budget_seconds: float | None = None
    estimated_seconds: float | None = None
    load_seconds: float = 0.0
    measure_seconds: float = 0.0
    network_seconds: float = 0.0
    write_seconds: float = 0.0
    memory: dict[str, Any] | None = None

    @property
    def seconds(self) -> float:
        return self.load_seconds + self.measure_seconds + self.network_seconds + self.write_seconds

    @property
    def held(self) -> bool | None:
        return None if self.budget_seconds is None else self.seconds <= self.budget_seconds

    @property
    def reduced(self) -> bool:
        return self.tta_passes < self.full_tta_passes or self.overlap < self.full_overlap

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        d.update(seconds=round(self.seconds, 3), held=self.held, reduced=self.reduced)
        return d


class RecordedSetting(Protocol):
    """What the record reads of a setting (:class:`~medseg.inference.time_budget.CaseSetting`)."""

    def to_dict(self) -> dict[str, Any]: ...


def record_document(
    records: Mapping[str, CaseRecord | Mapping[str, Any]],
    seconds_per_case: float | None,
    rule: str,
    options: Sequence[RecordedSetting],
) -> dict[str, Any]:
    """The JSON document of ``prediction_record.json``: the budget, the reduction order, per case what was
    used and took (records of earlier runs may be given as their dicts) and a summary."""
    cases = {c: (r.to_dict() if isinstance(r, CaseRecord) else dict(r)) for c, r in sorted(records.items())}
    return {
        "time_budget_per_case": None if seconds_per_case is None else round(float(seconds_per_case), 3),
        "rule": rule,
        "reduction_order": [o.to_dict() for o in options],
        "summary": _summary(cases),
        "cases": cases,
    }


def _summary(cases: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``summary`` of a record's per-case entries: count, mean seconds, in how many the budget held."""
    seconds = [float(r["seconds"]) for r in cases.values() if r.get("seconds") is not None]
    held = [r["held"] for r in cases.values() if r.get("held") is not None]
    return {
        "cases": len(cases),
        "mean_seconds": round(float(np.mean(seconds)), 3) if seconds else None,
        "held": sum(bool(h) for h in held) if held else None,
        "reduced": sum(bool(r.get("reduced")) for r in cases.values()),
    }


def merge_record_parts(path: Path) -> bool:
    """Fold the shard parts ``prediction_record.part-K-of-N.json`` beside ``path`` into it
    (:func:`~medseg.inference.shards.merge_parts`; the summary recomputed). True when there were parts."""
    return merge_parts(path, lambda head, cases: {**head, "summary": _summary(cases), "cases": cases})


def read_record_cases(path: Path) -> dict[str, dict[str, Any]]:
    """The per-case entries of an existing ``prediction_record.json`` (empty when missing or unreadable)."""
    try:
        cases = json.loads(Path(path).read_text()).get("cases", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): v for k, v in cases.items() if isinstance(v, dict)} if isinstance(cases, dict) else {}


def write_record(path: Path, document: Mapping[str, Any]) -> None:
    """Write ``document`` (:func:`record_document`) as JSON at ``path``, atomically."""
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")


__all__ = [
    "RECORD_NAME",
    "CaseRecord",
    "RecordedSetting",
    "merge_record_parts",
    "read_record_cases",
    "record_document",
    "write_record",
]
