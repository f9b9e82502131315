"""Helpers shared by the integration and fault tests (not fixtures)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from medseg.networks.spec import NetworkSpec
from medseg.planning.plan import NetworkPlan

#: ``medseg train`` arguments of a one-epoch, two-iteration CPU run in the main process (after WORK and --fold)
TINY_TRAIN = ["--epochs", "1", "--iters-per-epoch", "2", "--device", "cpu", "--num-workers", "0"]


def shrink_networks(work: Path, base_features: int = 8) -> None:
    """Edit ``WORK/plans.json`` as a user may: networks with ``base_features`` features (and 8x that at
    most), so training steps and sliding-window predictions take milliseconds to seconds."""
    path = work / "plans.json"
    plan = json.loads(path.read_text())
    for cfg in plan["configurations"].values():
        for net in cfg["networks"].values():
            net["spec"]["base_features"], net["spec"]["max_features"] = base_features, 8 * base_features
    path.write_text(json.dumps(plan, indent=1))


def assert_prediction_like_input(pred: Path, src: Path, allowed_ids: set[int]) -> None:
    """``pred`` has exactly the size, spacing, origin and direction of the input image ``src`` and holds
    only ``allowed_ids``."""
    import numpy as np
    import SimpleITK as sitk

    a, b = sitk.ReadImage(str(pred)), sitk.ReadImage(str(src))
    assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
    values = set(np.unique(sitk.GetArrayFromImage(a)).tolist())
    assert values <= allowed_ids, f"{pred.name}: ids {sorted(values - allowed_ids)} not allowed"


def network_plan(
    arch: str, patch_size: tuple[int, ...], batch_size: int, kernel_sizes: tuple, strides: tuple, **fields: Any
) -> NetworkPlan:
    """A :class:`NetworkPlan` from the flat fields of plan schema version 1 (topology next to patch and
    batch): ``precision`` and ``estimated_memory_gb`` go to the plan, every other field to its spec."""
    plan_fields = {k: fields.pop(k) for k in ("precision", "estimated_memory_gb") if k in fields}
    spec = NetworkSpec(arch=arch, kernel_sizes=kernel_sizes, strides=strides, **fields)
    return NetworkPlan(spec, patch_size=patch_size, batch_size=batch_size, **plan_fields)


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as module ``name`` (once; later calls return the same module)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
