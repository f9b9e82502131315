"""MONAI's SegResNetDS, SwinUNETR and DynUNet behind medseg's network interface: built from a spec, deep
supervision, the topologies they accept (and what the planner records for them), clear errors for the rest."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from monai.networks.nets import DynUNet, SegResNetDS, SwinUNETR

from medseg.errors import ConfigError, PlanError
from medseg.networks import NetworkSpec, accepted_spec, build_network, topology_problems
from medseg.networks.monai_nets import segresnet_kernels, segresnet_resolution
from medseg.planning.candidates import candidate_widths
from medseg.planning.memory_fitting import Fitter, fit_3d
from medseg.planning.plan import ConfigurationPlan, NetworkPlan, NormalizationSpec, Plan
from medseg.planning.planner_options import PlannerOptions

from .conftest import ANISO2, ANISO3, ISO2, ISO3, tiny_plan

SWIN_PATCH = {3: (32, 32, 64), 2: (32, 64)}


def _swin_plan(dims: int) -> NetworkPlan:
    spec = accepted_spec(NetworkSpec("swinunetr", ((3,) * dims,) * 2, ((1,) * dims, (2,) * dims), base_features=12))
    return NetworkPlan(spec, patch_size=SWIN_PATCH[dims], batch_size=2)


def _check_outputs(net: NetworkPlan, model: torch.nn.Module, n_outputs: int) -> None:
    x = torch.randn(2, 1, *net.patch_size)
    outs = model(x)
    assert isinstance(outs, list) == (n_outputs > 1)  # one output: a tensor, as medseg's own networks
    outs = outs if isinstance(outs, list) else [outs]
    assert len(outs) == len(model.output_scales) == n_outputs
    for out, scale in zip(outs, model.output_scales):
        assert tuple(out.shape) == (2, 3, *(p // s for p, s in zip(net.patch_size, scale)))
    model.eval()
    with torch.no_grad():
        assert tuple(model(x).shape) == (2, 3, *net.patch_size)


@pytest.mark.parametrize("topology", [ISO3, ANISO3, ISO2, ANISO2], ids=["iso3d", "aniso3d", "iso2d", "aniso2d"])
def test_segresnet_is_monai_segresnetds_on_the_planned_strides_with_a_head_per_decoder_level(topology):
    net = tiny_plan("segresnet", topology)
    net = dataclasses.replace(net, spec=accepted_spec(net.spec))
    assert net.spec.strides == topology["strides"]  # these topologies are MONAI's schedules already
    assert net.spec.kernel_sizes == topology["kernel_sizes"]  # and MONAI's kernels are the planned ones
    model = net.build(1, 3)
    assert isinstance(model.monai, SegResNetDS) and model.size_divisor == net.total_stride()
    assert model.monai.encoder.layers[0]["blocks"][0].conv1.kernel_size == topology["kernel_sizes"][0]
    _check_outputs(net, model.train(), net.spec.num_stages - 1)
    no_ds = dataclasses.replace(net, spec=dataclasses.replace(net.spec, deep_supervision=False))
    _check_outputs(no_ds, no_ds.build(1, 3).train(), 1)


def test_segresnet_keeps_the_planned_stages_monai_can_halve_and_takes_its_kernels_from_them():
    # z is halved late and stops early (it runs out of voxels): MONAI's schedule never stops an axis
    strides = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2))
    spec = NetworkSpec("segresnet", ((3, 3, 3),) * 6, strides, base_features=8, max_features=320)
    assert segresnet_resolution(strides[:4]) == (2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="cannot halve"):
        segresnet_resolution(strides)
    got = accepted_spec(spec)
    assert got.strides == strides[:4] and got.max_features == 8 * 2**3
    assert got.kernel_sizes == segresnet_kernels(strides[:4]) == ((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    assert accepted_spec(got) == got
    assert topology_problems(got, (16, 64, 64), "x") == []
    assert "cannot halve" in topology_problems(spec, None, "x")[0]
    wrong_kernels = dataclasses.replace(got, kernel_sizes=((3, 3, 3),) * 4)
    with pytest.raises(ConfigError, match=r"kernel_sizes must be \[\[1, 3, 3\]"):
        build_network(wrong_kernels, 1, 2)


@pytest.mark.parametrize("dims", [3, 2])
def test_swinunetr_has_a_fixed_topology_and_a_patch_of_multiples_of_32(dims):
    net = _swin_plan(dims)
    assert net.spec.total_stride() == (32,) * dims and not net.spec.deep_supervision
    model = net.build(1, 3)
    assert isinstance(model.monai, SwinUNETR)
    _check_outputs(net, model.train(), 1)
    assert candidate_widths(net) == [12, 24, 36]  # the budget grid's 16, 24, 32 as MONAI accepts them
    assert "single voxel" in topology_problems(net.spec, (32,) * dims, "x")[0]


def test_a_hand_edited_swinunetr_plan_fails_naming_the_file_and_the_size(tmp_path):
    net = _swin_plan(3)
    cfg = ConfigurationPlan(
        name="3d_fullres",
        dims=3,
        spacing=(1.0, 1.0, 1.0),
        median_shape=(36, 50, 35),
        networks={"swinunetr": net},
        default_arch="swinunetr",
        normalization=(NormalizationSpec("zscore", False),),
    )
    plan = Plan(
        dataset_name="t",
        channel_names=("MRI",),
        label_ids=(0, 1),
        label_names=("background", "x"),
        original_median_spacing=(1.0, 1.0, 1.0),
        original_median_shape=(36, 50, 35),
        configurations={"3d_fullres": cfg},
        default_configuration="3d_fullres",
    )
    path = tmp_path / "plans.json"
    plan.save(path)
    d = json.loads(path.read_text())
    d["configurations"]["3d_fullres"]["networks"]["swinunetr"]["patch_size"] = [40, 56, 40]
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError) as err:
        Plan.load(path)
    msg = str(err.value)
    assert str(path) in msg and "[40, 56, 40]" in msg and "[32, 32, 32]" in msg and "swinunetr" in msg
    d["configurations"]["3d_fullres"]["networks"]["swinunetr"]["patch_size"] = [32, 32, 32]
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="single voxel"):
        Plan.load(path)
    d["configurations"]["3d_fullres"]["networks"]["swinunetr"]["patch_size"] = [32, 32, 64]
    d["configurations"]["3d_fullres"]["networks"]["swinunetr"]["spec"]["base_features"] = 16
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match="divisible by 12, got 16"):
        Plan.load(path)


def test_dynunet_takes_the_planned_kernels_and_strides_as_they_are():
    net = tiny_plan("dynunet", ANISO3)
    model = net.build(1, 3)
    assert isinstance(model.monai, DynUNet)
    assert model.monai.input_block.conv1.conv.kernel_size == (1, 3, 3)
    _check_outputs(net, model.train(), net.spec.num_stages - 1)  # heads upsampled to full resolution
    assert model.output_scales == [(1, 1, 1)] * 3


def _toy_estimate(net: NetworkPlan, in_channels: int, num_classes: int) -> float:
    """GB growing with batch, patch voxels and width (the planner's shrinking only needs the order)."""
    return 1e-9 * net.batch_size * math.prod(net.patch_size) * net.spec.base_features


@pytest.mark.parametrize(
    "arch, spacing, median, budget_gb",
    [
        ("segresnet", (3.0, 0.8, 0.8), (40, 200, 180), 0.01),
        ("swinunetr", (1.0, 1.0, 1.0), (36, 50, 35), 0.005),
        ("swinunetr", (1.0, 1.0, 1.0), (36, 50, 35), 0.001),  # too small: stops before the refused 32^3
    ],
)
def test_the_planner_fits_a_topology_and_patch_the_network_accepts(arch, spacing, median, budget_gb):
    fitter = Fitter(PlannerOptions(gpu_memory_gb=budget_gb), _toy_estimate, 1, 3)
    net, notes = fit_3d(fitter, arch, spacing, median, 1e9)
    assert notes["shrink_steps"] > 0 or not notes["fits_budget"]
    assert net.check("fitted") == []  # the plan's validation: topology, patch and what the network accepts
    assert accepted_spec(net.spec) == net.spec
    if arch == "swinunetr":
        assert net.patch_size == (32, 64, 32) and net.spec.base_features == 36  # y: the longest median axis
    else:
        assert net.spec.strides[1] == (1, 2, 2)  # thick slices: MONAI halves the fine axes alone first
        assert segresnet_resolution(net.spec.strides) is not None
    model = build_network(net.spec, 1, 3, patch_size=net.patch_size)
    assert model.size_divisor == net.spec.total_stride()
