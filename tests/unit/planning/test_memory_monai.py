"""The simulated memory estimate of MONAI's networks against the measured peak of a real CPU training step:
within 5% (SwinUNETR's constructor reads tensor values, so it is built for real and its weights faked)."""

from __future__ import annotations

import dataclasses

import pytest

from medseg.networks import NetworkSpec, accepted_spec
from medseg.planning.memory import estimate_training_memory_gb, measure_training_peak_gb
from medseg.planning.plan import NetworkPlan

from ..networks.conftest import ANISO3, ISO3, _single_thread_seeded, tiny_plan  # noqa: F401  (autouse fixture)


def _swin() -> NetworkPlan:
    spec = accepted_spec(NetworkSpec("swinunetr", ((3, 3, 3),), ((1, 1, 1),), base_features=12))
    return NetworkPlan(spec, patch_size=(32, 32, 64), batch_size=2)


@pytest.mark.parametrize(
    "net",
    [
        dataclasses.replace(tiny_plan("segresnet", ISO3, base_features=8), patch_size=(32, 32, 32)),
        dataclasses.replace(tiny_plan("segresnet", ANISO3, base_features=8), patch_size=(16, 48, 32)),
        dataclasses.replace(tiny_plan("dynunet", ANISO3, base_features=8, max_features=32), patch_size=(16, 48, 32)),
        _swin(),
    ],
    ids=["segresnet-iso", "segresnet-aniso", "dynunet", "swinunetr"],
)
def test_estimate_is_within_5_percent_of_the_measured_cpu_peak(net):
    est = estimate_training_memory_gb(net, 1, 3)
    meas = measure_training_peak_gb(net, 1, 3)
    assert abs(est - meas) <= 0.05 * meas, f"{net.arch} {net.patch_size}: estimated {est:.4f} GiB, measured {meas:.4f}"
