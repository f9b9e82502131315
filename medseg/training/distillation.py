"""Knowledge distillation (``medseg train --distill-from RUN ...``): train one network on an ensemble's soft predictions.

The teachers are trained run folders (folds, configurations' architectures, ``--distill-checkpoint snapshots``
for every snapshot) of the *same configuration* as the student, so their preprocessed grid is the student's.
Their mean softmax on each preprocessed training case (:meth:`~medseg.inference.predictor.Predictor.
predict_preprocessed`, no TTA) is computed once and cached as float16 ``(K, Z, Y, X)`` under
``WORK/soft_targets/<configuration>/<key>/<case>.npy`` (``key``: a hash of the teachers' checkpoints), then
appended to the case's image channels, so the patch sampler crops, scales, rotates and mirrors them exactly like
the image (intensity augmentation leaves them alone; zero padding outside the image gives an all-zero target,
which adds nothing to the loss). The training step splits them off again before the network sees the patch.

Loss (Hinton et al. 2015, "Distilling the knowledge in a neural network")::

    Dice + CE on the labels (deep-supervised, as for any run)
      + weight * T^2 * mean over voxels of KL( softmax(log p_teacher / T) || softmax(z_student / T) )

on the full-resolution output, ``T`` the temperature (the ``T^2`` keeps the gradient's scale independent of
``T``). Voxels whose teacher probabilities sum to zero (padding) are left out of the mean. Region-based plans
and cascade stages are not supported. The student is an ordinary run: predict, find-best and export treat it
like any other. Train it in a work folder of its own when it shares the teachers' configuration and
architecture (a run folder cannot be its own teacher).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.inference.members import load_members, member_checkpoints
from medseg.inference.predictor import Predictor
from medseg.io.workdir import RunDir, WorkDir
from medseg.planning.stage import Stage
from medseg.progress import progress_bar
from medseg.training.data import CaseData
from medseg.training.distill_config import DistillConfig

__all__ = ["DistillConfig", "DistillationLoss", "attach_soft_targets", "distillation_kl", "split_soft_targets"]

logger = logging.getLogger(__name__)


def distillation_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 x`` mean over voxels of ``KL(teacher_T || student_T)`` (see the module docstring).

    Args:
        student_logits: ``(B, K, *spatial)`` logits.
        teacher_probs: ``(B, K, *spatial)`` probabilities (a voxel of all zeros is left out).
        temperature: ``T`` > 0.

    Returns:
        A float32 scalar (0 when no voxel has a teacher target).
    """
    t = float(temperature)
    teacher = teacher_probs.float()
    valid = teacher.sum(1) > 0.5  # (B, *spatial)
    log_teacher = torch.log_softmax(teacher.clamp_min(1e-8).log() / t, dim=1)
    log_student = torch.log_softmax(student_logits.float() / t, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(1)
    count = valid.sum()
    if count == 0:
        return student_logits.new_zeros((), dtype=torch.float32)
    return (kl * valid).sum() / count * (t * t)


class DistillationLoss(nn.Module):
    """The run's loss on ``(labels, teacher probabilities)`` targets (see the module docstring); on plain
    labels (the pseudo-Dice batches) it is the run's loss alone.

    Args:
        base: the run's deep-supervised Dice + CE loss (``outputs, labels -> loss``).
        weight / temperature: of the KL term.
    """

    def __init__(self, base: nn.Module, weight: float, temperature: float) -> None:
        super().__init__()
        self.base, self.weight, self.temperature = base, float(weight), float(temperature)

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: Any) -> torch.Tensor:
        if not isinstance(target, tuple):
            return self.base(outputs, target)
        labels, teacher = target
        loss = self.base(outputs, labels)
        top = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        return loss + self.weight * distillation_kl(top, teacher, self.temperature)


def split_soft_targets(x: torch.Tensor, y: torch.Tensor, input_channels: int) -> tuple[torch.Tensor, Any]:
    """``(network input, (labels, teacher probabilities))`` of a distillation batch whose ``x`` carries the teacher's
    ``K`` channels after the network's ``input_channels``."""
    return x[:, :input_channels], (y, x[:, input_channels:])


def _key(cfg: DistillConfig) -> str:
    """A name for the teachers: a hash of their checkpoints' paths, sizes and modification times."""
    h = hashlib.sha256(cfg.checkpoint.encode())
    for run in sorted(cfg.teachers):
        for name in member_checkpoints(run, cfg.checkpoint):
            path = RunDir(run).checkpoint(name)
            stat = path.stat() if path.is_file() else None
            h.update(f"{path.resolve()}|{stat.st_size if stat else 0}|{stat.st_mtime_ns if stat else 0}".encode())
    return h.hexdigest()[:16]


def attach_soft_targets(
    work_dir: str | Path, stage: Stage, cases: list[CaseData], cfg: DistillConfig, device: str, progress: bool = True
) -> list[CaseData]:
    """``cases`` with the teachers' probabilities appended to their image channels (float32 ``(C + K, Z, Y, X)``),
    computed once and cached (see the module docstring).

    Raises:
        ConfigError: a region-based plan, a cascade stage, a teacher of another configuration or class count,
            or a teacher that is the run being trained.
        CheckpointError: a teacher lacks the checkpoint.
    """
    if stage.plan.is_region_based or stage.in_channels != stage.plan.num_channels:
        raise ConfigError("distillation supports label-based plans without a cascade's previous stage only")
    members = load_members(list(cfg.teachers), cfg.checkpoint)
    for member in members:
        if member.configuration != stage.config_name or member.plan.num_classes != stage.num_classes:
            raise ConfigError(
                f"{member.source}: a teacher must be a run of the student's configuration {stage.config_name!r} with "
                f"{stage.num_classes} classes (it is {member.configuration!r}, {member.plan.num_classes} classes)"
            )
    folder = WorkDir(work_dir).soft_targets(stage.config_name, _key(cfg))
    folder.mkdir(parents=True, exist_ok=True)
    predictor: Predictor | None = None
    out = []
    for case in progress_bar(cases, desc="teacher soft targets", unit="case", disable=not progress):
        path = folder / f"{case.case_id}.npy"
        if not path.is_file():
            predictor = predictor or Predictor(members, device=device, use_tta=False)
            probs = predictor.predict_preprocessed(np.asarray(case.data), stage.config_name)
            tmp = folder / f".tmp_{case.case_id}.npy"
            np.save(tmp, probs.astype(np.float16))
            os.replace(tmp, path)
        soft = np.load(path)
        if soft.shape[1:] != case.data.shape[1:]:
            raise ConfigError(f"{path}: soft targets {list(soft.shape)} do not fit the case {list(case.data.shape)}")
        data = np.concatenate([np.asarray(case.data, dtype=np.float32), soft.astype(np.float32)])
        out.append(replace(case, data=data))
    logger.info("distillation: soft targets of %d teacher member(s) in %s", len(members), folder)
    return out
