"""Ensemble members: trained networks rebuilt from their run folders.

A run folder ``WORK/runs/<config>/<arch>/fold_<k>`` holds ``checkpoint_{final,best,latest}.pt``; each
checkpoint stores the plan, configuration and architecture it was trained with, so the folder alone is
enough to rebuild the network (:func:`load_member`). Which run folders (and postprocessing rules) make up
the ensemble of a whole work folder is chosen above inference, by
:func:`medseg.ensembling.selection.select_work_dir_runs`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medseg.errors import CheckpointError, ConfigError, MedsegError
from medseg.io.checkpoint import load_checkpoint
from medseg.io.workdir import RunDir
from medseg.options import CheckpointName, choices
from medseg.planning.plan import Plan
from medseg.planning.stage import Stage
from medseg.preprocessing.case import preprocessing_fingerprint

logger = logging.getLogger(__name__)

#: The names of one checkpoint of a run (``snapshots`` names a set of them: :func:`member_checkpoints`).
CHECKPOINT_NAMES: tuple[str, ...] = tuple(c for c in choices(CheckpointName) if c != CheckpointName.SNAPSHOTS)


@dataclass
class EnsembleMember:
    """One trained network of an ensemble.

    Attributes:
        model: the network; ``forward((B, C, *patch)) -> logits (B, K, *patch)`` in eval mode.
        plan: the plan it was trained with (its ``label_ids`` and preprocessing are used).
        configuration: configuration name (selects the preprocessing and the patch size).
        arch: architecture name.
        source: where it came from (checkpoint path), for messages.
        stage: ``(plan, configuration, arch)`` resolved once (:class:`~medseg.planning.stage.Stage`).

    Raises:
        PlanError: the configuration or architecture is not in the plan.
    """

    model: torch.nn.Module
    plan: Plan
    configuration: str
    arch: str
    source: str = ""
    stage: Stage = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.stage = Stage.resolve(self.plan, self.configuration, self.arch)

    @classmethod
    def of_stage(cls, model: torch.nn.Module, stage: Stage, source: str = "") -> EnsembleMember:
        """The member of ``model`` trained as ``stage``."""
        return cls(model=model, plan=stage.plan, configuration=stage.config_name, arch=stage.arch, source=source)


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def load_member(run_dir: str | Path, checkpoint: str = "final") -> EnsembleMember:
    """Rebuild one trained network from its run folder (the folder alone is enough).

    Args:
        run_dir: ``WORK/runs/<config>/<arch>/fold_<k>``.
        checkpoint: ``final``, ``best``, ``latest`` or a snapshot's name (``snapshot_1``, ...).

    Returns:
        The member, model on the CPU in eval mode.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, or its weights do not fit the network
            the recorded plan describes.
    """
    if checkpoint not in CHECKPOINT_NAMES and not RunDir.is_snapshot_name(checkpoint):
        raise CheckpointError(
            f"checkpoint must be one of {list(CHECKPOINT_NAMES)} or {RunDir.snapshot_name(1)}, ...; got {checkpoint!r}"
        )
    run_dir = Path(run_dir)
    path = RunDir(run_dir).checkpoint(checkpoint)
    if not path.is_file():
        present = RunDir(run_dir).checkpoints_present()
        hint = f"; present: {present}" if present else ""
        raise CheckpointError(f"{path}: checkpoint not found{hint}")
    ckpt = load_checkpoint(path)
    try:
        plan = Plan.from_dict(ckpt["plan"])
        configuration = str(ckpt["configuration"])
        arch = str(ckpt["arch"])
        state = ckpt["model"]
    except KeyError as exc:
        raise CheckpointError(f"{path}: checkpoint lacks the key {exc}; not a medseg checkpoint") from None
    except MedsegError as exc:
        raise CheckpointError(f"{path}: the plan stored in the checkpoint is invalid: {exc}") from None
    _check_belongs_to_run(path, run_dir, plan, configuration, arch)
    stage = Stage.resolve(plan, configuration, arch)
    model = stage.network.build(stage.in_channels, stage.num_classes)
    try:
        model.load_state_dict(_strip_prefixes(state))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the {arch} network of its plan ({first})") from None
    model.eval()
    return EnsembleMember.of_stage(model, stage, source=str(path))


def member_checkpoints(run_dir: str | Path, checkpoint: str) -> list[str]:
    """The checkpoint names of ``run_dir`` that ``checkpoint`` selects: every snapshot present (by cycle) for
    ``snapshots``, else ``[checkpoint]``; each becomes one ensemble member."""
    if checkpoint == CheckpointName.SNAPSHOTS:
        return RunDir(run_dir).snapshots_present()
    return [checkpoint]


def has_checkpoint(run_dir: str | Path, checkpoint: str) -> bool:
    """Whether ``run_dir`` holds what ``checkpoint`` selects (for ``snapshots``: at least one snapshot)."""
    names = member_checkpoints(run_dir, checkpoint)
    return bool(names) and all(RunDir(run_dir).checkpoint(n).is_file() for n in names)


def load_members(run_dirs: Sequence[str | Path], checkpoint: str = "final") -> list[EnsembleMember]:
    """The members of ``run_dirs``: one per run, or one per snapshot of each run for ``snapshots``
    (:func:`load_member` each).

    Raises:
        CheckpointError: a run lacks the checkpoint (for ``snapshots``: has no snapshot), or one does not load.
    """
    members = []
    for run_dir in run_dirs:
        names = member_checkpoints(run_dir, checkpoint)
        if not names:
            present = RunDir(run_dir).checkpoints_present()
            raise CheckpointError(
                f"{run_dir}: no snapshot checkpoints (present: {present or 'none'}); train it with --snapshots N"
            )
        members += [load_member(run_dir, name) for name in names]
    return members


#: Plan fields that identify the dataset a network was trained on.
_DATASET_FIELDS = ("dataset_name", "channel_names", "label_ids", "label_names")


def _check_belongs_to_run(path: Path, run_dir: Path, plan: Plan, configuration: str, arch: str) -> None:
    """Refuse a checkpoint copied in from another run: it would predict with a plan this folder does not hold.

    Compares the checkpoint's configuration/architecture with the run folder's place
    (``runs/<configuration>/<arch>/fold_<k>``), and its dataset (name, channels, labels) and preprocessing
    (:func:`~medseg.preprocessing.case.preprocessing_fingerprint`) with the run folder's ``plans.json``,
    where these exist.

    Raises:
        CheckpointError: naming what differs.
    """
    diffs = []
    run = RunDir(run_dir)
    if run.in_runs_folder and (run.configuration, run.arch) != (configuration, arch):
        diffs.append(f"it is a {configuration}/{arch} network, the folder is {run.configuration}/{run.arch}")
    run_plan_path = run.plans
    if run_plan_path.is_file():
        run_plan = Plan.load(run_plan_path)
        diffs += [
            f"{k} {getattr(plan, k)!r} vs {getattr(run_plan, k)!r}"
            for k in _DATASET_FIELDS
            if getattr(plan, k) != getattr(run_plan, k)
        ]
        if (
            not diffs
            and configuration in run_plan.configurations
            and preprocessing_fingerprint(plan, configuration) != preprocessing_fingerprint(run_plan, configuration)
        ):
            diffs.append(f"the preprocessing (spacing, normalisation) of {configuration}")
    if diffs:
        raise CheckpointError(
            f"{path}: belongs to another plan than its run folder {run_dir} ({'; '.join(diffs)}); it was "
            "copied from another run or dataset: put this run's checkpoint back or train the run again"
        )


def refuse_cascades(plan: Plan, configurations: Sequence[str], what: str) -> None:
    """Refuse ``what`` (e.g. ``"a model bundle"``) for cascade configurations, whose networks need their
    previous stage's segmentation as input.

    Raises:
        ConfigError: naming the cascades and what to do instead.
    """
    cascades = sorted({c for c in configurations if plan.configuration(c).previous_stage is not None})
    if cascades:
        prev = plan.configuration(cascades[0]).previous_stage
        raise ConfigError(
            f"{what} of the cascade {', '.join(cascades)} is not supported: its networks take the {prev} "
            f"segmentation as input channels. Choose other configurations (--config 3d_fullres {prev}), or predict "
            f"with the cascade from the work folder (`medseg predict -m WORK --config {cascades[0]}`)"
        )
