"""Tiny network plans for the network tests, and single-threaded torch (tiny tensors gain nothing from
threads, and a second busy process on a 2-core machine makes spinning OpenMP threads crawl)."""

from __future__ import annotations

import pytest
import torch

from medseg.networks.spec import NetworkSpec
from medseg.planning.plan import NetworkPlan

ISO3 = dict(
    patch_size=(16, 16, 16), strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)), kernel_sizes=((3, 3, 3),) * 4
)
# thick slices: z is strided late and convolved in-plane only at full resolution
ANISO3 = dict(
    patch_size=(8, 32, 24),
    strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
    kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
)
ISO2 = dict(patch_size=(32, 32), strides=((1, 1), (2, 2), (2, 2), (2, 2)), kernel_sizes=((3, 3),) * 4)
ANISO2 = dict(
    patch_size=(16, 48), strides=((1, 1), (1, 2), (2, 2), (2, 2)), kernel_sizes=((1, 3), (3, 3), (3, 3), (3, 3))
)
TOPOLOGIES = {"iso3d": ISO3, "aniso3d": ANISO3, "iso2d": ISO2, "aniso2d": ANISO2}
ARCHS = ("unet", "deeplab", "psp", "fcn")


def tiny_plan(arch: str, topology: dict, **overrides) -> NetworkPlan:
    """A network plan with 4..16 features and batch 2 on ``topology``."""
    fields = dict(arch=arch, base_features=4, max_features=16, **topology)
    fields.update(overrides)
    patch = fields.pop("patch_size")
    return NetworkPlan(NetworkSpec(**fields), patch_size=patch, batch_size=2)


@pytest.fixture(autouse=True)
def _single_thread_seeded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
