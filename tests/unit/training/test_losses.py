"""Loss values on hand-made tensors, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.training.losses import (
    CrossEntropyLoss,
    DeepSupervisionLoss,
    DiceCELoss,
    SoftDiceLoss,
    deep_supervision_weights,
    downsample_target,
    hard_dice_counts,
    one_hot,
    soft_dice_per_class,
)

LN3 = math.log(3.0)


def _const_logits(p1: float, shape=(1, 4)) -> torch.Tensor:
    """Two-class logits whose softmax is ``(1 - p1, p1)`` at every voxel; shape ``(B, 2, *spatial)``."""
    b, *spatial = shape
    logits = torch.zeros((b, 2, *spatial))
    logits[:, 1] = math.log(p1 / (1 - p1))
    return logits


def test_soft_dice_and_ce_exact_values():
    logits = _const_logits(0.75)  # p(class 1) = 0.75 everywhere, 4 voxels
    target = torch.tensor([[1, 1, 0, 0]])
    # class 1: TP = 2 * 0.75 = 1.5, sum p = 3, sum y = 2 -> Dice = (3 + s) / (5 + s)
    s = 1e-5
    expected_dice = (3 + s) / (5 + s)
    assert SoftDiceLoss(smooth=s)(logits, target).item() == pytest.approx(1 - expected_dice, abs=1e-6)
    # CE = -(2 ln 0.75 + 2 ln 0.25) / 4
    expected_ce = -(2 * math.log(0.75) + 2 * math.log(0.25)) / 4
    assert CrossEntropyLoss()(logits, target).item() == pytest.approx(expected_ce, abs=1e-6)
    total = DiceCELoss(dice_weight=2.0, ce_weight=0.5)(logits, target).item()
    assert total == pytest.approx(2 * (1 - expected_dice) + 0.5 * expected_ce, abs=1e-6)


def test_background_is_excluded_and_perfect_prediction_scores_zero():
    target = torch.tensor([[0, 1, 2, 2]])
    logits = one_hot(target, 3) * 40.0  # essentially exact one-hot probabilities
    assert SoftDiceLoss()(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    # background perfectly right, both foreground classes wrong: loss 1 (background ignored)
    wrong = one_hot(torch.tensor([[0, 2, 1, 1]]), 3) * 40.0
    assert SoftDiceLoss()(wrong, target).item() == pytest.approx(1.0, abs=1e-5)
    assert SoftDiceLoss(include_background=True)(wrong, target).item() == pytest.approx(2 / 3, abs=1e-5)


def test_batch_dice_differs_from_per_sample_dice():
    # sample 0: p = 0.75 on 4 voxels, target [1,1,0,0]; sample 1: same probabilities, target all 0
    logits = _const_logits(0.75, shape=(2, 4))
    target = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    s = 1e-5
    d0 = (3 + s) / (5 + s)
    d1 = (0 + s) / (3 + s)
    per_sample = SoftDiceLoss(smooth=s)(logits, target).item()
    assert per_sample == pytest.approx(1 - (d0 + d1) / 2, abs=1e-6)
    # batch: TP = 1.5, sum p = 6, sum y = 2
    batch = SoftDiceLoss(batch_dice=True, smooth=s)(logits, target).item()
    assert batch == pytest.approx(1 - (3 + s) / (8 + s), abs=1e-6)
    per_class = soft_dice_per_class(torch.softmax(logits, 1), one_hot(target, 2), batch_dice=False, smooth=s)
    assert per_class.shape == (2, 2)


def test_focal_class_weights_and_label_smoothing():
    logits = _const_logits(0.75)
    target = torch.tensor([[1, 1, 0, 0]])
    # focal gamma 2: voxels of class 1 have p_t = 0.75, class 0 p_t = 0.25
    f1 = (0.25**2) * -math.log(0.75)
    f0 = (0.75**2) * -math.log(0.25)
    assert CrossEntropyLoss(focal_gamma=2.0)(logits, target).item() == pytest.approx((2 * f1 + 2 * f0) / 4, abs=1e-6)
    # class weights (1, 3): weighted mean over voxels
    w_ce = (3 * 2 * -math.log(0.75) + 1 * 2 * -math.log(0.25)) / (3 * 2 + 1 * 2)
    assert CrossEntropyLoss(class_weights=[1.0, 3.0])(logits, target).item() == pytest.approx(w_ce, abs=1e-6)
    assert CrossEntropyLoss(class_weights=[1.0, 3.0], focal_gamma=2.0)(logits, target).item() == pytest.approx(
        (3 * 2 * f1 + 2 * f0) / 8, abs=1e-6
    )
    # label smoothing eps: (1 - eps) * nll + eps * mean_k(-log p_k); mean_k(-log p) = -(ln .25 + ln .75) / 2
    eps = 0.2
    smooth_term = -(math.log(0.25) + math.log(0.75)) / 2
    expected = ((1 - eps) * (2 * -math.log(0.75) + 2 * -math.log(0.25)) / 4) + eps * smooth_term
    assert CrossEntropyLoss(label_smoothing=eps)(logits, target).item() == pytest.approx(expected, abs=1e-6)
    # the focal implementation with gamma -> 0 limit must agree with torch's label-smoothed CE
    assert CrossEntropyLoss(label_smoothing=eps, focal_gamma=1e-9)(logits, target).item() == pytest.approx(
        expected, abs=1e-5
    )


def test_deep_supervision_weights_and_target_downsampling():
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(3, zero_lowest=True) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(1, zero_lowest=True) == [1.0]
    t = torch.arange(16).reshape(1, 4, 4)
    assert downsample_target(t, (2, 2)).tolist() == [[[0, 2], [8, 10]]]
    assert downsample_target(t, (4, 2)).tolist() == [[[0, 2], [4, 6], [8, 10], [12, 14]]]
    t3 = torch.zeros(1, 3, 4, 4, dtype=torch.long)
    assert downsample_target(t3, (2, 2, 2)).shape == (1, 2, 2, 2)  # non-integer factor on the first axis


def test_deep_supervision_loss_is_the_weighted_sum():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8))
    full = torch.randn(2, 3, 8, 8)
    half = torch.randn(2, 3, 4, 4)
    base = DiceCELoss()
    expected = 2 / 3 * base(full, target) + 1 / 3 * base(half, target[:, ::2, ::2])
    got = DeepSupervisionLoss(base)([full, half], target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert DeepSupervisionLoss(base)(full, target).item() == pytest.approx(base(full, target).item(), rel=1e-6)


def test_hard_dice_counts():
    target = torch.tensor([[0, 1, 1, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 2, 2, 2, 0]])
    counts = hard_dice_counts(one_hot(pred, 3), target)
    # rows TP, FP, FN per class
    assert counts.tolist() == [[1, 1, 2], [1, 0, 1], [0, 1, 1]]


def test_losses_backpropagate_under_bf16_autocast_outputs():
    logits = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    loss = DiceCELoss()(logits, target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()
