"""Region-based training: region targets from class indices, Dice + BCE values, ignore masking, pseudo Dice
counts, and a training step of every architecture (2D and 3D) with one sigmoid output per region."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medseg.errors import ConfigError
from medseg.training.losses import DeepSupervisionLoss
from medseg.training.region_losses import RegionDiceBCELoss, region_dice_counts, region_loss, region_targets

from ..networks.conftest import ARCHS, ISO2, ISO3, tiny_plan

# class indices 0..3 (label_ids (0, 1, 2, 3)); regions: all = {1,2,3}, inner = {2,3}, small = {3}
REGIONS = ((1, 2, 3), (2, 3), (3,))


def test_region_targets_follow_membership_and_mask_the_ignore_class():
    target = torch.tensor([[0, 1, 2, 3, 4]])  # 4 = ignore class
    y, keep = region_targets(target, REGIONS, ignore_index=4)
    assert y.shape == (1, 3, 5) and y.dtype == torch.float32
    assert y[0].tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0]]
    assert keep[0, 0].tolist() == [True, True, True, True, False]
    assert region_targets(target[:, :4], REGIONS)[1] is None


def test_dice_bce_value_on_a_hand_made_tensor():
    target = torch.tensor([[0, 1, 2, 3]])
    logits = torch.tensor([[[0.0, 2.0, -1.0, 1.0], [1.0, 0.0, 3.0, -2.0], [-1.0, -1.0, 0.5, 2.0]]])
    loss = RegionDiceBCELoss(REGIONS, batch_dice=True, smooth=0.0)(logits, target)
    y = torch.tensor([[[0.0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]])
    p = torch.sigmoid(logits)
    dice = [(2 * (p[0, r] * y[0, r]).sum() / (p[0, r].sum() + y[0, r].sum())).item() for r in range(3)]
    bce = F.binary_cross_entropy_with_logits(logits, y).item()
    assert loss.item() == pytest.approx(1 - sum(dice) / 3 + bce, rel=1e-6)


def test_ignored_voxels_change_nothing_and_get_no_gradient():
    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 6, 6))
    target[:, :2] = 4
    logits = torch.randn(2, 3, 6, 6, requires_grad=True)
    loss_fn = RegionDiceBCELoss(REGIONS, ignore_index=4)
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.all(logits.grad[:, :, :2] == 0) and torch.any(logits.grad[:, :, 2:] != 0)
    changed = logits.detach().clone()
    changed[:, :, :2] = 50.0
    assert loss_fn(changed, target).item() == pytest.approx(loss.item(), rel=1e-6)
    # the annotated voxels alone give the same value
    cropped = RegionDiceBCELoss(REGIONS)(logits.detach()[:, :, 2:], target[:, 2:])
    assert cropped.item() == pytest.approx(loss.item(), rel=1e-5)


def test_perfect_logits_give_a_small_loss_at_every_deep_supervision_level():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    target[0, 3:5, 3:5] = 3
    y, _ = region_targets(target, REGIONS)
    outputs = [20 * (2 * y - 1), 20 * (2 * y[:, :, ::2, ::2] - 1)]
    loss = DeepSupervisionLoss(RegionDiceBCELoss(REGIONS))(outputs, target)
    assert 0 <= loss.item() < 1e-3


def test_region_loss_refuses_softmax_only_options():
    kw = dict(dice_weight=1.0, ce_weight=1.0, batch_dice=False, smooth=1e-5, ignore_index=None)
    assert isinstance(region_loss(REGIONS, **kw), RegionDiceBCELoss)
    with pytest.raises(ConfigError, match="class_weights"):
        region_loss(REGIONS, class_weights=(1.0, 2.0), **kw)
    with pytest.raises(ConfigError, match="focal_gamma"):
        region_loss(REGIONS, focal_gamma=2.0, **kw)


def test_region_dice_counts_threshold_at_one_half_and_skip_ignored():
    target = torch.tensor([[0, 1, 2, 3, 4]])
    logits = torch.tensor([[[1.0, 1.0, 1.0, -1.0, 5.0], [-1.0, -1.0, 1.0, 1.0, 5.0], [0.0, 0.0, 0.0, 1.0, 5.0]]])
    counts = region_dice_counts(logits, target, REGIONS, ignore_index=4)
    # region all: pred 0,1,2 ; ref 1,2,3 -> tp 2, fp 1, fn 1; inner: pred 2,3 ref 2,3; small: p=0.5 is not > 0.5
    assert counts.tolist() == [[2, 2, 1], [1, 0, 0], [1, 0, 0]]


@pytest.mark.parametrize("topology", [ISO3, ISO2], ids=["3d", "2d"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_trains_one_sigmoid_output_per_region(arch, topology):
    torch.set_num_threads(1)
    net = tiny_plan(arch, topology)
    model = net.build(1, len(REGIONS))
    x = torch.randn(2, 1, *net.patch_size)
    target = torch.randint(0, 5, (2, *net.patch_size))
    out = model(x)
    outputs = out if isinstance(out, list) else [out]
    assert all(o.shape[1] == len(REGIONS) for o in outputs)
    loss = DeepSupervisionLoss(RegionDiceBCELoss(REGIONS, ignore_index=4))(out, target)
    loss.backward()
    assert math.isfinite(loss.item())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
