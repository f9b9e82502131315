"""The simulated memory estimate against the measured peak of a real CPU training step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medseg.planning import memory
from medseg.planning.memory import estimate_training_memory_gb, measure_training_peak_gb

from ..networks.conftest import ARCHS, ISO2, ISO3, _single_thread_seeded, tiny_plan  # noqa: F401  (autouse fixture)

PATCHES_3D = [(16, 16, 16), (16, 32, 24), (32, 32, 32)]


def memory_plan(arch):
    return tiny_plan(arch, ISO3, base_features=8, max_features=32)


def _plan(arch, patch, **kw):
    return dataclasses.replace(memory_plan(arch), patch_size=patch, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_estimate_is_within_15_percent_of_the_measured_cpu_peak(arch):
    for patch in PATCHES_3D:
        net = _plan(arch, patch)
        est = estimate_training_memory_gb(net, 1, 3)
        meas = measure_training_peak_gb(net, 1, 3)
        assert abs(est - meas) <= 0.15 * meas, f"{arch} {patch}: estimated {est:.4f} GiB, measured {meas:.4f} GiB"


def test_estimate_grows_with_patch_and_batch_and_derives_batches_exactly():
    net = _plan("unet", (16, 32, 32), batch_size=1)
    one = estimate_training_memory_gb(net, 1, 3)
    two = estimate_training_memory_gb(dataclasses.replace(net, batch_size=2), 1, 3)
    derived = estimate_training_memory_gb(dataclasses.replace(net, batch_size=7), 1, 3)
    trace = memory._simulate_trace(dataclasses.replace(net, batch_size=7), 1, 3, torch.get_num_threads())
    exact = max(trace) / memory.GIB
    assert one < two < derived
    assert derived == pytest.approx(exact, rel=1e-9)
    bigger = estimate_training_memory_gb(dataclasses.replace(net, patch_size=(32, 32, 32)), 1, 3)
    assert bigger > one
    # parameters, gradients and momentum: a wider network costs more at the same patch
    wide_spec = dataclasses.replace(net.spec, base_features=16, max_features=64)
    wide = estimate_training_memory_gb(dataclasses.replace(net, spec=wide_spec), 1, 3)
    assert wide > one


def test_reduced_precision_halves_activation_memory():
    net = dataclasses.replace(memory_plan("unet"), patch_size=(32, 32, 32), batch_size=2)
    fp32 = estimate_training_memory_gb(net, 1, 3)
    bf16 = estimate_training_memory_gb(dataclasses.replace(net, precision="bf16"), 1, 3)
    assert 0.45 * fp32 < bf16 < 0.8 * fp32


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="this CPU has no native bf16 convolutions (oneDNN falls back to reference kernels with im2col buffers)",
)
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_estimate_matches_measured_peak_where_the_cpu_supports_bf16(arch):
    for patch in [(32, 32), (64, 64), (64, 96)]:
        base = memory_plan(arch)
        spec = dataclasses.replace(base.spec, strides=ISO2["strides"], kernel_sizes=ISO2["kernel_sizes"])
        net = dataclasses.replace(base, spec=spec, patch_size=patch, precision="bf16")
        est = estimate_training_memory_gb(net, 1, 3)
        meas = measure_training_peak_gb(net, 1, 3)
        assert abs(est - meas) <= 0.15 * meas, f"{arch} {patch}: estimated {est:.4f} GiB, measured {meas:.4f} GiB"


def test_estimate_leaves_the_random_number_stream_alone():
    net = dataclasses.replace(memory_plan("deeplab"), patch_size=(16, 16, 16), batch_size=3)  # has dropout
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    assert estimate_training_memory_gb(net, 1, 3, device="cuda") > 0
    torch.testing.assert_close(torch.rand(4), expected)


def test_cpu_workspace_grows_with_threads_for_wide_weights():
    # oneDNN keeps per-thread weight-gradient buffers: with wide bottleneck weights more threads need more
    base = memory_plan("unet")
    spec = dataclasses.replace(base.spec, base_features=32, max_features=320)
    net = dataclasses.replace(base, spec=spec, patch_size=(16, 16, 16))
    one = estimate_training_memory_gb(net, 1, 3, threads=1)
    eight = estimate_training_memory_gb(net, 1, 3, threads=8)
    assert eight > one * 1.2
