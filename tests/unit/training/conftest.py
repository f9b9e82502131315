"""Fixtures for the training tests: a tiny preprocessed work folder with a tiny network plan."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.training.data import CaseData


def shrink_plan(plan):
    """The plan with tiny networks (4 base features, small patches) so a training step takes milliseconds."""
    configs = {}
    for name, cfg in plan.configurations.items():
        net = cfg.network()
        if cfg.dims == 3:
            spec = dataclasses.replace(
                net.spec,
                kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
                strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
                base_features=4,
                max_features=16,
            )
            tiny = dataclasses.replace(net, spec=spec, patch_size=(8, 16, 16), batch_size=2)
        else:
            spec = dataclasses.replace(
                net.spec,
                kernel_sizes=((3, 3), (3, 3), (3, 3)),
                strides=((1, 1), (2, 2), (2, 2)),
                base_features=4,
                max_features=16,
            )
            tiny = dataclasses.replace(net, spec=spec, patch_size=(16, 16), batch_size=4)
        configs[name] = dataclasses.replace(cfg, networks={cfg.default_arch: tiny})
    return dataclasses.replace(plan, configurations=configs, device="cpu").validate()


@pytest.fixture(scope="session")
def _tiny_work_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medseg.io.synthetic import generate_synthetic_dataset
    from medseg.pipeline import plan_and_preprocess
    from medseg.planning.planner import PlannerOptions

    root = tmp_path_factory.mktemp("tiny")
    data = generate_synthetic_dataset(root / "data", num_cases=6, seed=0)
    work = root / "work"
    result = plan_and_preprocess(data, work, PlannerOptions(device="cpu"), configs=["3d_fullres", "2d"], num_workers=1)
    shrink_plan(result.plan).save(work / "plans.json")
    return work


@pytest.fixture
def tiny_work(_tiny_work_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a preprocessed 6-case synthetic work folder whose plan has tiny networks."""
    dst = tmp_path / "work"
    shutil.copytree(_tiny_work_template, dst)
    return dst


def make_case(case_id: str, shape=(12, 20, 20), boxes=None, seed: int = 0) -> CaseData:
    """A hand-made training case: noise image, cuboid labels ``{class: (z0, z1, y0, y1, x0, x1)}``."""
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, np.int8)
    for k, (z0, z1, y0, y1, x0, x1) in (boxes or {1: (4, 8, 8, 12, 8, 12)}).items():
        seg[z0:z1, y0:y1, x0:x1] = k
    data = (rng.standard_normal((1, *shape)) + seg[None]).astype(np.float32)
    locs = {int(k): np.argwhere(seg == k).astype(np.int32) for k in np.unique(seg) if k != 0}
    return CaseData(case_id, data, seg, locs)
