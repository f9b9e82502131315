"""Fitting patch and batch to the memory budget, pinned with the reference memory model."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.planning.planner import PlannerOptions, plan_dataset

from .conftest import BRATS, CALLS, LIVERLIKE, make_ds, make_fp, plan, reference_estimator


def test_memory_budget_2_8_80_gb():
    small, mid, big = (plan(*BRATS, gpu=g).configuration("3d_fullres") for g in (2.0, 8.0, 80.0))
    assert small.patch_size == (80, 96, 80) and small.network().spec.num_stages == 5
    assert mid.patch_size == (128, 128, 128) and mid.network().spec.num_stages == 6
    # 80 GB: the patch stops at the (rounded-up) image size, the 5% cap limits the batch
    assert big.patch_size == (160, 192, 160)
    for cfg, gpu in ((small, 2.0), (mid, 8.0), (big, 80.0)):
        net = cfg.network()
        assert net.batch_size >= 2
        assert 0 < net.estimated_memory_gb <= gpu
        assert net.estimated_memory_gb == pytest.approx(reference_estimator(net, 1, 3), abs=1e-4)
    total = 10 * 138 * 169 * 138
    assert big.batch_size == max(2, int(0.05 * total / np.prod(big.patch_size)))
    big_plan = plan(*BRATS, gpu=80.0)
    assert "5% dataset cap" in big_plan.notes["configurations"]["3d_fullres"]["unet"]["batch_rule"]


def test_batch_is_the_largest_that_fits_when_memory_limits_it():
    many = ([(1.0, 1.0, 1.0)] * 400, [(138, 169, 138)] * 400)  # large dataset: the 5% cap is far away
    p = plan(*many, gpu=24.0)
    net = p.configuration("3d_fullres").network()
    assert net.batch_size > 2
    assert reference_estimator(net, 1, 3) <= 24.0
    from dataclasses import replace

    assert reference_estimator(replace(net, batch_size=net.batch_size + 1), 1, 3) > 24.0


def test_estimates_are_memoised():
    CALLS.clear()
    plan(*LIVERLIKE)
    keys = [(n.arch, n.patch_size, n.batch_size, n.spec.strides, n.dims) for n in CALLS]
    assert len(keys) == len(set(keys))


def test_batch_never_below_two_even_when_nothing_fits():
    def overhead_estimator(net, c, k):  # 1 GB fixed: nothing fits 0.5 GB
        return 1.0 + reference_estimator(net, c, k)

    p = plan_dataset(make_ds(), make_fp(*BRATS), PlannerOptions(gpu_memory_gb=0.5), memory_estimator=overhead_estimator)
    for cfg in p.configurations.values():
        assert cfg.batch_size == 2
        assert cfg.patch_size == (8,) * cfg.dims  # shrunk as far as it goes
    assert p.notes["configurations"]["3d_fullres"]["unet"]["fits_budget"] is False


def test_tiny_images_that_cannot_shrink_still_get_a_plan():
    p = plan([(1.0, 1.0, 1.0)] * 4, [(6, 7, 8)] * 4, gpu=1e-9)
    assert p.configuration("3d_fullres").patch_size == (6, 7, 8)
    assert p.configuration("3d_fullres").batch_size == 2
