"""Plan dataclasses: exact JSON round-trip, and edited plans that are inconsistent are refused."""

from __future__ import annotations

import json

import pytest

from medseg.errors import PlanError
from medseg.planning.plan import ConfigurationPlan, NormalizationSpec, Plan
from tests.helpers import network_plan


def make_plan() -> Plan:
    net = network_plan(
        arch="unet",
        patch_size=(40, 56, 40),
        batch_size=4,
        kernel_sizes=((3, 3, 3),) * 4,
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
        options={"residual_encoder": False},
        estimated_memory_gb=1.25,
    )
    net2d = network_plan(
        arch="unet",
        patch_size=(56, 40),
        batch_size=32,
        kernel_sizes=((3, 3),) * 4,
        strides=((1, 1), (2, 2), (2, 2), (2, 2)),
    )
    norm = (NormalizationSpec("ct", clip_low=-100.0, clip_high=300.0, mean=50.0, std=80.5),)
    cfgs = {
        "3d_fullres": ConfigurationPlan("3d_fullres", 3, (1.0, 1.0, 1.0), (36, 50, 35), norm, {"unet": net}),
        "2d": ConfigurationPlan("2d", 2, (1.0, 1.0, 1.0), (36, 50, 35), norm, {"unet": net2d}),
    }
    return Plan(
        "demo",
        ("CT",),
        (0, 1, 5, 117),
        ("background", "a", "b", "c"),
        (1.0, 1.0, 1.0),
        (36, 50, 35),
        cfgs,
        notes={"why": ["median spacing"]},
    )


def test_json_round_trip_is_exact():
    plan = make_plan()
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan
    assert back.to_json() == text
    d = json.loads(text)
    assert d["configurations"]["3d_fullres"]["networks"]["unet"]["patch_size"] == [40, 56, 40]
    assert d["configurations"]["3d_fullres"]["networks"]["unet"]["spec"]["arch"] == "unet"
    assert "patch_size" not in d["configurations"]["3d_fullres"]  # the default network's, not repeated
    assert back.configuration("3d_fullres").patch_size == (40, 56, 40)
    assert back.configuration("3d_fullres").batch_size == 4
    assert d["configurations"]["3d_fullres"]["spacing"] == [1.0, 1.0, 1.0]
    assert d["schema_version"] == 2
    assert back.num_classes == 4


def test_save_and_load(tmp_path):
    plan = make_plan()
    plan.save(tmp_path / "plans.json")
    assert Plan.load(tmp_path / "plans.json") == plan
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def _edited(mutate) -> dict:
    d = make_plan().to_dict()
    mutate(d)
    return d


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (
            lambda d: d["configurations"]["3d_fullres"]["networks"]["unet"].__setitem__("patch_size", [42, 56, 40]),
            "not divisible",
        ),
        (lambda d: d["configurations"]["3d_fullres"].__setitem__("batch_size", 7), "unknown key(s) ['batch_size']"),
        (lambda d: d["configurations"]["3d_fullres"].__setitem__("bogus", 1), "unknown key"),
        (lambda d: d["configurations"]["3d_fullres"].pop("spacing"), "missing key 'spacing'"),
        (
            lambda d: d["configurations"]["2d"]["normalization"][0].__setitem__("scheme", "minmax"),
            "scheme must be one of",
        ),
        (lambda d: d.__setitem__("label_ids", [1, 2, 3, 4]), "background 0"),
        (
            lambda d: d["configurations"]["3d_fullres"]["networks"]["unet"]["spec"]["strides"][0].__setitem__(0, 2),
            "strides[0]",
        ),
        (
            lambda d: d["configurations"]["3d_fullres"]["networks"]["unet"].__setitem__("patch_size", [40.5, 56, 40]),
            "expected integers",
        ),
        (lambda d: d.__setitem__("default_configuration", "3d_lowres"), "default_configuration"),
        (
            lambda d: d["configurations"]["3d_fullres"]["networks"]["unet"]["spec"].__setitem__("norm", "layer"),
            "norm must be",
        ),
        (
            lambda d: d["configurations"]["2d"].__setitem__("mirror_axes", [0, 2]),
            "mirror_axes must be distinct patch axes in 0..1",
        ),
        (
            lambda d: d["configurations"]["3d_fullres"].__setitem__("mirror_axes", [1, 1]),
            "mirror_axes must be distinct",
        ),
        (lambda d: d["configurations"]["3d_fullres"].__setitem__("mirror_axes", [0.5]), "expected integers"),
    ],
)
def test_inconsistent_edits_are_refused(mutate, needle):
    with pytest.raises(PlanError) as info:
        Plan.from_dict(_edited(mutate))
    assert needle in str(info.value)


def test_load_reports_path_and_bad_json(tmp_path):
    p = tmp_path / "plans.json"
    p.write_text("{not json")
    with pytest.raises(PlanError, match="plans.json"):
        Plan.load(p)
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.json")


def test_unknown_architecture_lookup_lists_planned():
    cfg = make_plan().configuration("3d_fullres")
    with pytest.raises(PlanError, match=r"planned: \['unet'\]"):
        cfg.network("deeplab")
    assert cfg.network().patch_size == (40, 56, 40)


def test_mirror_axes_round_trip_and_default_to_every_axis():
    plan = make_plan()
    assert plan.configuration("3d_fullres").mirror_axes is None
    assert plan.configuration("3d_fullres").resolved_mirror_axes() == (0, 1, 2)
    assert plan.configuration("2d").resolved_mirror_axes() == (0, 1)
    d = plan.to_dict()
    d["configurations"]["3d_fullres"]["mirror_axes"] = [2]
    d["configurations"]["2d"]["mirror_axes"] = []
    back = Plan.from_dict(d)
    assert back.configuration("3d_fullres").resolved_mirror_axes() == (2,)
    assert back.configuration("2d").resolved_mirror_axes() == ()
    assert Plan.from_json(back.to_json()) == back
    old = plan.to_dict()  # a plan written before mirror_axes existed: every axis, as before
    del old["configurations"]["3d_fullres"]["mirror_axes"]
    assert Plan.from_dict(old).configuration("3d_fullres").resolved_mirror_axes() == (0, 1, 2)
