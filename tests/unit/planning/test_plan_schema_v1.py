"""Plans of schema version 1 (flat network entries, patch and batch repeated per configuration) still load.

``data/hippocampus_plan_v1.json`` is ``plans/hippocampus.json`` as written before the schema bump (commit
720bf50); ``plans/hippocampus.json`` is the same plan re-saved in schema version 2.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from medseg.errors import PlanError
from medseg.inference.members import load_member
from medseg.io.checkpoint import save_checkpoint
from medseg.planning.plan import SCHEMA_VERSION, Plan

HERE = Path(__file__).resolve().parent
V1_PLAN = HERE / "data" / "hippocampus_plan_v1.json"
V2_PLAN = HERE.parents[2] / "plans" / "hippocampus.json"
SPEC_KEYS = (
    "arch",
    "kernel_sizes",
    "strides",
    "base_features",
    "max_features",
    "n_conv_per_stage",
    "norm",
    "deep_supervision",
    "options",
)


def _v1() -> dict:
    d = json.loads(V1_PLAN.read_text())
    assert d["schema_version"] == 1
    return d


def test_v1_plan_file_loads_and_resaves_as_v2_with_the_same_content(tmp_path):
    v1 = _v1()
    plan = Plan.load(V1_PLAN)
    assert SCHEMA_VERSION == 2 and plan.schema_version == 2
    for name, cfg_v1 in v1["configurations"].items():
        cfg = plan.configuration(name)
        assert list(cfg.patch_size) == cfg_v1["patch_size"] and cfg.batch_size == cfg_v1["batch_size"]
        for arch, net_v1 in cfg_v1["networks"].items():
            net = cfg.network(arch)
            assert {k: json.loads(json.dumps(getattr(net.spec, k))) for k in SPEC_KEYS} == {
                k: net_v1[k] for k in SPEC_KEYS
            }
            assert [list(net.patch_size), net.batch_size, net.precision, net.estimated_memory_gb] == [
                net_v1["patch_size"],
                net_v1["batch_size"],
                net_v1["precision"],
                net_v1["estimated_memory_gb"],
            ]
    assert plan.notes == v1["notes"]

    plan.save(tmp_path / "plans.json")
    saved = json.loads((tmp_path / "plans.json").read_text())
    assert saved["schema_version"] == 2
    assert all("patch_size" not in c and "batch_size" not in c for c in saved["configurations"].values())
    assert Plan.load(tmp_path / "plans.json") == plan
    assert (tmp_path / "plans.json").read_text() == V2_PLAN.read_text()  # the checked-in plan is the migrated one


def test_v1_configuration_whose_patch_differs_from_its_default_network_is_refused():
    v1 = _v1()
    v1["configurations"]["3d_fullres"]["batch_size"] = 3
    with pytest.raises(
        PlanError,
        match=r"configurations\.3d_fullres: patch_size/batch_size .* differ from those of "
        r"its default network",
    ):
        Plan.from_dict(v1)
    v1 = _v1()
    v1["configurations"]["2d"]["patch_size"] = [64, 64]
    with pytest.raises(PlanError, match=r"configurations\.2d"):
        Plan.from_dict(v1)


def test_v1_dict_is_not_modified_by_loading():
    v1 = _v1()
    before = copy.deepcopy(v1)
    Plan.from_dict(v1)
    assert v1 == before


def test_v1_plan_embedded_in_a_checkpoint_loads(tmp_path):
    plan = Plan.load(V1_PLAN)
    model = plan.configuration("2d").network().build(plan.num_channels, plan.num_classes)
    run = tmp_path / "runs" / "2d" / "unet" / "fold_0"
    run.mkdir(parents=True)
    (tmp_path / "plans.json").write_text(V1_PLAN.read_text())
    save_checkpoint(
        {
            "model": model.state_dict(),
            "epoch": 1,
            "iteration": 10,
            "train_config": {},
            "plan": _v1(),
            "configuration": "2d",
            "arch": "unet",
        },
        run / "checkpoint_final.pt",
    )
    member = load_member(run, "final")
    assert member.plan == plan
    for a, b in zip(member.model.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b)
