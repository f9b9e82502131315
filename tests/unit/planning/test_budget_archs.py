"""The time-budget fit across architectures (``--archs unet segresnet --time-budget``): each architecture fitted
on its own, the winners compared under the same rule, the best one becomes the configuration's default."""

from __future__ import annotations

from dataclasses import replace

import pytest

from medseg.planning.budget import fit_plan_to_budget
from medseg.planning.budget_archs import fit_archs_to_budget
from tests.helpers import network_plan

from .conftest import hippocampus_like_plan
from .test_budget import FakeClock, no_bf16  # noqa: F401  (fixture)


class ArchClock(FakeClock):
    """FakeClock whose ``deeplab`` steps take ``factor`` times as long as the U-Net's."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def __call__(self, net, cin, k, device, precision, channels_last, steps):
        t = super().__call__(net, cin, k, device, precision, channels_last, steps)
        return t * (self.factor if net.arch == "deeplab" else 1.0)


@pytest.mark.usefixtures("no_bf16")
@pytest.mark.parametrize("factor, winner", [(0.5, "deeplab"), (2.0, "unet")])
def test_the_faster_architecture_wins_at_equal_capacity_and_both_keep_their_fit(factor, winner):
    plan = hippocampus_like_plan()
    fitted = fit_archs_to_budget(plan, "cpu", 60, configuration="3d_fullres", measure_fn=ArchClock(factor))
    cfg = fitted.configuration("3d_fullres")
    assert cfg.default_arch == winner and fitted.default_configuration == "3d_fullres"
    notes = fitted.notes["budget"]
    assert notes["arch"] == winner and set(notes["architectures"]) == {"unet", "deeplab"}
    assert f"{winner} wins" in notes["architecture_choice"]
    for arch, record in notes["architectures"].items():  # every architecture keeps its own fitted network
        net = cfg.network(arch)
        assert (net.spec.base_features, list(net.patch_size), net.batch_size) == (
            record["chosen"]["base_features"],
            record["chosen"]["patch_size"],
            record["chosen"]["batch_size"],
        )
    assert cfg.patch_size == cfg.network(winner).patch_size


@pytest.mark.usefixtures("no_bf16")
def test_one_architecture_fits_exactly_as_before():
    plan = hippocampus_like_plan()
    cfg = plan.configuration("3d_fullres")
    only_unet = replace(cfg, networks={"unet": cfg.network("unet")})
    plan = replace(plan, configurations={**plan.configurations, "3d_fullres": only_unet})
    a = fit_archs_to_budget(plan, "cpu", 22, configuration="3d_fullres", measure_fn=FakeClock())
    b = fit_plan_to_budget(plan, "cpu", 22, configuration="3d_fullres", measure_fn=FakeClock())
    assert a.configuration("3d_fullres") == b.configuration("3d_fullres")
    assert "architectures" not in a.notes["budget"]


class SegResNetClock(FakeClock):
    """FakeClock whose ``segresnet`` steps take ``factor`` times as long as the U-Net's."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def __call__(self, net, cin, k, device, precision, channels_last, steps):
        t = super().__call__(net, cin, k, device, precision, channels_last, steps)
        return t * (self.factor if net.arch == "segresnet" else 1.0)


@pytest.mark.usefixtures("no_bf16")
@pytest.mark.parametrize("factor, winner", [(0.5, "segresnet"), (2.0, "unet")])
def test_monai_segresnet_is_a_candidate_of_the_fit_across_architectures(factor, winner):
    plan = hippocampus_like_plan()
    cfg = plan.configuration("3d_fullres")
    unet = cfg.network("unet")
    segresnet = network_plan(
        arch="segresnet",
        patch_size=unet.patch_size,
        batch_size=5,
        kernel_sizes=((3, 3, 3),) * 4,
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
    )
    plan = replace(
        plan,
        configurations={
            **plan.configurations,
            "3d_fullres": replace(cfg, networks={"unet": unet, "segresnet": segresnet}),
        },
    )
    fitted = fit_archs_to_budget(plan, "cpu", 60, configuration="3d_fullres", measure_fn=SegResNetClock(factor))
    out = fitted.configuration("3d_fullres")
    notes = fitted.notes["budget"]
    assert out.default_arch == winner and set(notes["architectures"]) == {"unet", "segresnet"}
    record = notes["architectures"]["segresnet"]["chosen"]
    net = out.network("segresnet")  # the MONAI network keeps its own fitted size, with a memory estimate
    assert (net.spec.base_features, list(net.patch_size), net.batch_size) == (
        record["base_features"],
        record["patch_size"],
        record["batch_size"],
    )
    assert net.estimated_memory_gb > 0
