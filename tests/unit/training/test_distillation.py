"""Distillation loss on hand-made logits: zero when the student matches the teacher, the hand-computed value,
the gradient's direction, padding left out, and the split of a batch's teacher channels."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.errors import ConfigError
from medseg.training.config import TrainConfig
from medseg.training.distill_config import DistillConfig
from medseg.training.distillation import DistillationLoss, distillation_kl, split_soft_targets


def _voxel(values: list[float]) -> torch.Tensor:
    """``(1, K, 1, 1, 1)`` from K values."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1, 1)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_is_zero_when_the_student_matches_the_teacher(temperature: float) -> None:
    teacher = _voxel([0.7, 0.2, 0.1])
    assert float(distillation_kl(teacher.log(), teacher, temperature)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_kl(teacher.log() + 3.0, teacher, temperature)) == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_a_hand_computation() -> None:
    # teacher (0.8, 0.2) at T=2: p ~ sqrt -> (2/3, 1/3); student logits (0, 0) at T=2 -> (1/2, 1/2)
    expected = 4 * (2 / 3 * math.log((2 / 3) / 0.5) + 1 / 3 * math.log((1 / 3) / 0.5))
    got = distillation_kl(_voxel([0.0, 0.0]), _voxel([0.8, 0.2]), 2.0)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_gradient_moves_the_student_towards_the_teacher() -> None:
    logits = _voxel([0.0, 0.0, 0.0]).requires_grad_(True)
    distillation_kl(logits, _voxel([0.1, 0.8, 0.1]), 2.0).backward()
    grad = logits.grad.flatten()
    assert grad[1] < 0 < grad[0] and grad[2] > 0  # descent raises the teacher's class, lowers the others


def test_padding_voxels_are_left_out() -> None:
    student = torch.zeros(1, 2, 1, 1, 2)
    teacher = torch.zeros(1, 2, 1, 1, 2)
    teacher[0, :, 0, 0, 0] = torch.tensor([0.9, 0.1])  # voxel 1 is padding (all zero)
    one = distillation_kl(student[..., :1], teacher[..., :1], 1.0)
    assert float(distillation_kl(student, teacher, 1.0)) == pytest.approx(float(one), rel=1e-6)
    assert float(distillation_kl(student, torch.zeros_like(teacher), 1.0)) == 0.0


def test_loss_adds_the_weighted_kl_and_batches_split() -> None:
    class Base(torch.nn.Module):  # a stand-in for Dice + CE: the mean label
        def forward(self, outputs: object, labels: torch.Tensor) -> torch.Tensor:
            return labels.float().mean()

    loss = DistillationLoss(Base(), weight=0.5, temperature=2.0)
    x = torch.cat([torch.randn(2, 1, 2, 2, 2), torch.full((2, 2, 2, 2, 2), 0.5)], dim=1)
    y = torch.ones(2, 2, 2, 2, dtype=torch.int8)
    net_in, target = split_soft_targets(x, y, input_channels=1)
    assert net_in.shape == (2, 1, 2, 2, 2) and target[1].shape == (2, 2, 2, 2, 2) and target[0] is y
    logits = torch.zeros(2, 2, 2, 2, 2)
    logits[:, 0] = 2.0
    kl = distillation_kl(logits, target[1], 2.0)
    assert float(kl) > 0
    assert float(loss([logits, logits[:, :, :1]], target)) == pytest.approx(1.0 + 0.5 * float(kl), rel=1e-6)
    assert float(loss(logits, y)) == pytest.approx(1.0)  # plain labels: the base loss alone


def test_config_checks_and_round_trip() -> None:
    cfg = TrainConfig(distill=DistillConfig(("/runs/fold_0",), 0.5, 3.0))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="temperature"):
        TrainConfig(distill=DistillConfig(("/r",), 1.0, 0.0)).validate()
    with pytest.raises(ConfigError, match="teachers"):
        TrainConfig(distill=DistillConfig()).validate()
