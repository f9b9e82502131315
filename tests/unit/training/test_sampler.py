"""Patch sampling: foreground oversampling, class balance, determinism, rank slices, 2D."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from medseg.training.config import AugmentationConfig
from medseg.training.data import PatchSampler, batch_iterator, num_foreground_samples
from tests.unit.training.conftest import make_case


def _cases():
    # big volumes with small structures: random patches rarely contain foreground
    small = {1: (20, 24, 30, 36, 30, 36), 2: (40, 42, 10, 12, 50, 52)}  # class 2 is tiny (2x2x2)
    return [make_case(f"c{i}", shape=(48, 64, 64), boxes=small if i < 3 else {1: small[1]}, seed=i) for i in range(6)]


def test_number_of_forced_samples():
    assert num_foreground_samples(9, 0.33) == 3
    assert num_foreground_samples(2, 0.33) == 1
    assert num_foreground_samples(1, 0.33) == 0
    assert num_foreground_samples(4, 0.0) == 0


def test_forced_samples_contain_foreground_balanced_over_classes():
    sampler = PatchSampler(_cases(), (8, 12, 12), batch_size=6, foreground_oversample=0.33, seed=0)
    centre_classes = Counter()
    random_with_fg = 0
    for it in range(60):
        _, y = sampler.batch(it)
        for j in range(6):
            if j >= 6 - sampler.num_forced:  # forced: the centre voxel is foreground
                c = int(y[j, 3, 5, 5])  # a voxel-centred even patch puts the voxel at index (P - 1) // 2
                centre_classes[c] += 1
                assert c in (1, 2)
            else:
                random_with_fg += int((y[j] > 0).any())
    assert sampler.num_forced == 2
    # class 2 occupies 8 voxels in 3 of 6 cases, yet is drawn about as often as class 1
    assert 0.35 < centre_classes[2] / sum(centre_classes.values()) < 0.65
    assert random_with_fg < 0.3 * 60 * 4  # foreground is rare in random patches: the forcing is what matters


def test_batches_are_deterministic_and_rank_slices_compose():
    sampler = PatchSampler(_cases(), (8, 12, 12), 5, 0.4, AugmentationConfig(p_rotation=0.5, p_scale=0.5), seed=7)
    x1, y1 = sampler.batch(11)
    x2, y2 = sampler.batch(11)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    xa, ya = sampler.batch(11, 0, 3)
    xb, yb = sampler.batch(11, 3, 5)
    assert torch.equal(torch.cat([xa, xb]), x1) and torch.equal(torch.cat([ya, yb]), y1)
    assert not torch.equal(sampler.batch(12)[0], x1)
    # background workers produce the same stream in the same order
    inline = batch_iterator(sampler, start=3, num_workers=0)
    workers = batch_iterator(sampler, start=3, num_workers=2)
    for _ in range(4):
        (a, b), (c, d) = next(inline), next(workers)
        assert torch.equal(a, c) and torch.equal(b, d)
    workers._shutdown_workers()


def test_2d_patches_are_slices():
    case = make_case("c0", shape=(6, 30, 30), boxes={1: (2, 4, 10, 20, 10, 20)})
    x, y = PatchSampler([case], (16, 16), 4, 0.5, AugmentationConfig(), seed=0).batch(0)
    assert x.shape == (4, 1, 16, 16) and y.shape == (4, 16, 16)
    assert np.isin(torch.unique(y).numpy(), [0, 1]).all()
    plain = PatchSampler([case], (16, 16), 4, 0.5, None, seed=0)
    for it in range(5):
        x, y = plain.batch(it)
        assert (y[2:, 7, 7] == 1).all()  # the two forced samples are centred on foreground
