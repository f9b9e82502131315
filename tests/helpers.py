"""Helpers shared by the integration and fault tests (not fixtures)."""

from __future__ import annotations

import json
from pathlib import Path


def shrink_networks(work: Path, base_features: int = 8) -> None:
    """Edit ``WORK/plans.json`` as a user may: networks with ``base_features`` features (and 8x that at
    most), so training steps and sliding-window predictions take milliseconds to seconds."""
    path = work / "plans.json"
    plan = json.loads(path.read_text())
    for cfg in plan["configurations"].values():
        for net in cfg["networks"].values():
            net["base_features"], net["max_features"] = base_features, 8 * base_features
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
