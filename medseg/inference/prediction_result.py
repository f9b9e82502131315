"""What :func:`~medseg.inference.folder.predict_folder` did: cases written, skipped and failed, warnings, the
per-case records and the time budget, with the summary ``medseg predict`` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medseg.inference.prediction_record import CaseRecord
from medseg.inference.shards import Shard

__all__ = ["PredictionResult"]


@dataclass
class PredictionResult:
    """Outcome of :func:`predict_folder`.

    Attributes:
        output_dir: where segmentations were written.
        written: case ids written.
        skipped: case ids whose output already existed.
        failed: case id -> message.
        warnings: messages worth the user's attention (e.g. unusual spacing).
        seconds: wall time.
        records: per written case, the TTA passes and overlap used and its seconds
            (:class:`~medseg.inference.prediction_record.CaseRecord`; also in ``OUT/prediction_record.json``).
        time_budget: the per-case budget in seconds (None = no limit) and :attr:`budget_rule`, where it came from.
        shard: the share of the folder's cases this run predicted (None = all).
    """

    output_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    records: dict[str, CaseRecord] = field(default_factory=dict)
    time_budget: float | None = None
    budget_rule: str = ""
    shard: Shard | None = None

    @property
    def ok(self) -> bool:
        """True when no case failed."""
        return not self.failed

    def summary(self) -> str:
        lines = [f"predicted {len(self.written)} case(s) into {self.output_dir} in {self.seconds:.1f} s"]
        lines[0] += f" ({self.shard.label})" if self.shard else ""
        if self.skipped:
            lines[0] += f"; {len(self.skipped)} skipped (output exists; --overwrite to redo)"
        if self.failed:
            lines[0] += f"; {len(self.failed)} FAILED:"
            lines += [f"  {case}: {msg}" for case, msg in self.failed.items()]
        if self.time_budget is not None and self.records:
            lines.append(self.budget_summary())
        return "\n".join(lines)

    def budget_summary(self) -> str:
        """One line: the per-case budget, in how many cases it held, and the settings used."""
        recs = list(self.records.values())
        held = sum(bool(r.held) for r in recs)
        used: dict[tuple[int, float], int] = {}
        for r in recs:
            used[(r.tta_passes, r.overlap)] = used.get((r.tta_passes, r.overlap), 0) + 1
        settings = ", ".join(f"{n} x (TTA {p}, overlap {o:g})" for (p, o), n in sorted(used.items(), reverse=True))
        mean = sum(r.seconds for r in recs) / len(recs)
        return (
            f"time budget {self.time_budget:g} s per case ({self.budget_rule}): held in {held} of {len(recs)} "
            f"case(s), mean {mean:.1f} s; used {settings}"
        )
