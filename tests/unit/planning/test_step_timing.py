"""Timing real training steps."""

from __future__ import annotations

import math

from medseg.planning.step_timing import measure_step_time
from tests.helpers import network_plan


def test_real_measurement_of_a_tiny_network_is_positive_and_finite(one_thread):
    net = network_plan(
        arch="unet",
        patch_size=(8, 16, 16),
        batch_size=2,
        kernel_sizes=((3, 3, 3),) * 3,
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
        base_features=4,
        max_features=16,
    )
    t = measure_step_time(net, 1, 3, "cpu", "fp32", True, 2)
    assert math.isfinite(t) and 0 < t < 30
