"""What a training run did, as opposed to what it was asked to do: :class:`RunRecord`.

:class:`~medseg.training.config.TrainConfig` (``config.json``) holds the settings of a run; the run record
(its own JSON file in the run folder, written atomically beside ``config.json`` by
:func:`medseg.training.train`) holds what happened on the way: the time-budget refit of the plan, the
pretrained weights loaded, the check of a reduced precision. Run folders written before the record
existed carry these keys in ``config.json`` (and in their checkpoints' ``train_config``):
:meth:`RunRecord.from_config_dict` reads them from there, and
:meth:`TrainConfig.from_dict <medseg.training.config.TrainConfig.from_dict>` leaves them out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError
from medseg.io.codec import from_json_dict, to_json_dict
from medseg.io.json_files import load_json_file


@dataclass(frozen=True)
class RunRecord:
    """What a training run did (set by :func:`~medseg.training.train`, never by hand).

    Attributes:
        budget_fit: what a time-budgeted run did about a plan not fitted to its budget
            (:func:`~medseg.training.budget_refit.fit_run_to_budget`: the refit - why, from what to what,
            in how many seconds - or why the plan was kept). None when the plan was fitted to it or there is
            no budget.
        pretrained_report: what was loaded from ``TrainConfig.pretrained``
            (:func:`~medseg.training.pretrained.load_pretrained`: source, member, counts, the tensors
            skipped and why). None without pretrained weights.
        precision_check: a CPU run at a reduced precision first runs one training step of its network in a
            child process (:func:`~medseg.training.device.checked_precision`): the check's precision,
            channels_last, status, seconds and threads, and ``fallback: "fp32"`` when the step crashed its
            process (the run then trains in fp32 and ``TrainConfig.precision`` says so). None when nothing
            was checked.
        intensity_augmentation: how a time-budgeted run that left ``augmentation.intensity`` unset chose it
            from its training cases (:func:`~medseg.training.intensity_rule.decide_intensity_augmentation`:
            the choice, the across-case spread of the label intensities and the reason). None otherwise.
    """

    budget_fit: dict[str, Any] | None = None
    pretrained_report: dict[str, Any] | None = None
    precision_check: dict[str, Any] | None = None
    intensity_augmentation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of Python builtins."""
        return to_json_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "run record") -> RunRecord:
        """Inverse of :meth:`to_dict`; unknown keys or wrong types raise :class:`ConfigError`."""
        return from_json_dict(cls, d, where, ConfigError)

    @classmethod
    def from_config_dict(cls, d: dict[str, Any], where: str = "training configuration") -> RunRecord:
        """The record a ``config.json`` (or a checkpoint's ``train_config``) held before the run record existed.

        Keys other than :data:`RUN_RECORD_KEYS` are ignored; a configuration without them gives an empty record.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
        return cls.from_dict({k: d[k] for k in RUN_RECORD_KEYS if k in d}, where)

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        """Read a run record file; a missing or malformed file raises :class:`ConfigError` naming it."""
        return load_json_file(path, cls.from_dict, "run record", ConfigError)


#: Keys of the run record, which ``config.json`` held before the record had a file of its own.
RUN_RECORD_KEYS: tuple[str, ...] = tuple(f.name for f in fields(RunRecord))

__all__ = ["RUN_RECORD_KEYS", "RunRecord"]
