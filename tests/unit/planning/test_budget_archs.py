"""The time-budget fit across architectures (``--archs unet segresnet --time-budget``): each architecture fitted
on its own, the winners compared under the same rule, the best one becomes the configuration's default."""

from __future__ import annotations

from dataclasses import replace

import pytest

from medseg.planning.budget import fit_plan_to_budget
from medseg.planning.budget_archs import fit_archs_to_budget

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
