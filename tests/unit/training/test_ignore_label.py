"""Training with an ignore label: ignored voxels contribute nothing to the loss, metrics or sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.preprocessing.labels import sample_class_locations
from medseg.training.augmentation import SpatialParams, extract_patch
from medseg.training.data import CaseData, PatchSampler, _locations_to_arrays
from medseg.training.losses import (
    CrossEntropyLoss,
    DeepSupervisionLoss,
    DiceCELoss,
    SoftDiceLoss,
    downsample_target,
    hard_dice_counts,
)

K = 3  # classes 0, 1, 2; index 3 marks ignored voxels


def _batch(seed=0, shape=(2, 6, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((shape[0], K, *shape[1:]), generator=g)
    target = torch.randint(0, K, shape, generator=g)
    ignore = torch.rand(shape, generator=g) < 0.4
    return logits, torch.where(ignore, K, target), ignore


def _kept(logits, target, ignore):
    """The non-ignored voxels as one batch of one 1D "image": logits (1, K, N), target (1, N)."""
    keep = ~ignore
    return logits.movedim(1, -1)[keep].T.unsqueeze(0), target[keep].unsqueeze(0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"class_weights": [0.2, 1.0, 3.0]},
        {"label_smoothing": 0.1},
        {"class_weights": [0.2, 1.0, 3.0], "label_smoothing": 0.1},
        {"focal_gamma": 2.0},
        {"focal_gamma": 2.0, "class_weights": [0.2, 1.0, 3.0], "label_smoothing": 0.1},
    ],
)
def test_cross_entropy_with_ignore_equals_the_loss_on_the_other_voxels(kwargs):
    logits, target, ignore = _batch()
    got = CrossEntropyLoss(**kwargs, ignore_index=K)(logits, target)
    want = CrossEntropyLoss(**kwargs)(*_kept(logits, target, ignore))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if not kwargs:
        torch.testing.assert_close(got, F.cross_entropy(logits, target, ignore_index=K))


def test_dice_with_ignore_equals_the_dice_on_the_other_voxels():
    logits, target, ignore = _batch()
    got = SoftDiceLoss(batch_dice=True, ignore_index=K)(logits, target)
    want = SoftDiceLoss(batch_dice=True)(*_kept(logits, target, ignore))
    torch.testing.assert_close(got, want)
    one = SoftDiceLoss(ignore_index=K)(logits[:1], target[:1])  # per-sample Dice, one sample
    torch.testing.assert_close(one, SoftDiceLoss()(*_kept(logits[:1], target[:1], ignore[:1])))


def test_gradient_is_zero_at_ignored_voxels_at_every_deep_supervision_level():
    logits, target, ignore = _batch(shape=(2, 8, 8, 8))
    full = logits.clone().requires_grad_()
    half = F.avg_pool3d(logits, 2).clone().requires_grad_()
    quarter = F.avg_pool3d(logits, 4).clone().requires_grad_()
    loss = DeepSupervisionLoss(DiceCELoss(ignore_index=K))([full, half, quarter], target)
    loss.backward()
    for out in (full, half, quarter):
        t = downsample_target(target, out.shape[2:])
        assert (t == K).any() and (t != K).any()
        grad = out.grad.abs().sum(1)
        assert torch.all(grad[t == K] == 0)
        assert torch.all(grad[t != K] > 0)


def test_deep_supervision_targets_keep_the_ignore_index():
    target = torch.zeros((1, 8, 8, 8), dtype=torch.int8)
    target[0, :, :4] = K
    target[0, 4:, 4:] = 1
    for size in ((4, 4, 4), (2, 2, 2), (3, 3, 3)):  # strided and interpolated paths
        t = downsample_target(target, size)
        assert set(torch.unique(t).tolist()) == {0, 1, K}


def test_a_batch_of_only_ignored_voxels_gives_zero_loss_and_gradient():
    logits = torch.randn((1, K, 4, 4, 4), requires_grad=True)
    target = torch.full((1, 4, 4, 4), K)
    for loss_fn in (DiceCELoss(ignore_index=K), DiceCELoss(ignore_index=K, focal_gamma=2.0, class_weights=[1, 2, 3])):
        loss = loss_fn(logits, target)
        assert loss.detach().item() == 0.0
        loss.backward()
        assert torch.all(logits.grad == 0)


def test_hard_dice_counts_skip_ignored_voxels():
    logits, target, ignore = _batch()
    counts = hard_dice_counts(logits, target)
    kept_logits, kept_target = _kept(logits, target, ignore)
    torch.testing.assert_close(counts, hard_dice_counts(kept_logits, kept_target))
    assert int(counts[0].sum() + counts[2].sum()) == int((~ignore).sum())  # TP + FN = annotated voxels


def _ignore_case(case_id, seed):
    """A 2-class case (K = 2) whose upper half is unannotated (index 2) except for a small structure."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((24, 32, 32), np.int8)
    seg[:12] = 2
    seg[16:20, 10:14, 20:24] = 1
    data = rng.standard_normal((1, *seg.shape)).astype(np.float32)
    return CaseData(case_id, data, seg, _locations_to_arrays(sample_class_locations(seg, 2, seed=seed)))


def test_oversampling_never_centres_on_ignored_voxels():
    cases = [_ignore_case(f"c{i}", i) for i in range(3)]
    assert all(set(c.locations) == {1} for c in cases)
    sampler = PatchSampler(cases, (8, 12, 12), batch_size=4, foreground_oversample=0.5, seed=0)
    assert sampler.foreground_classes == [1]
    seen_ignore = False
    for it in range(30):
        _, y = sampler.batch(it)
        for j in range(4 - sampler.num_forced, 4):
            assert int(y[j, 3, 5, 5]) == 1
        seen_ignore |= bool((y == 2).any())
    assert seen_ignore  # random samples do reach the unannotated half, and keep its index


def test_augmented_patches_keep_the_ignore_index_and_pad_with_background():
    case = _ignore_case("c", 0)
    rot = np.array([[1.0, 0, 0], [0, np.cos(0.5), -np.sin(0.5)], [0, np.sin(0.5), np.cos(0.5)]])
    for params in (
        SpatialParams(center=np.array([2.0, 2.0, 2.0]), flips=(2,)),
        SpatialParams(
            center=np.array([2.0, 2.0, 2.0]), matrix=rot * 0.9, elastic_seed=1, elastic_alpha=2.0, elastic_sigma=4.0
        ),
    ):
        _, lab = extract_patch(case.data, case.seg, params, (12, 12, 12))
        assert set(torch.unique(lab).tolist()) == {0, 2}  # patch corner lies outside the case: padded with 0
        assert int(lab[0, 0, 0]) == 0 and int(lab[8, 8, 8]) == 2
