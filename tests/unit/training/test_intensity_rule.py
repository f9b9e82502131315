"""The intensity-augmentation rule of time-budgeted runs: per-case class statistics and the decision."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medseg.io.image import ImageGeometry
from medseg.pipeline import plan_and_preprocess
from medseg.planning.planner import PlannerOptions
from medseg.preprocessing import list_preprocessed_cases, load_case_properties
from medseg.preprocessing.case import CaseProperties
from medseg.preprocessing.intensity import MIN_CLASS_VOXELS, class_intensity_stats
from medseg.training.intensity_rule import HOMOGENEOUS_SPREAD, MIN_CASES, decide_intensity_augmentation
from tests.conftest import shared_dataset


def test_class_statistics_are_per_class_and_channel():
    rng = np.random.default_rng(0)
    seg = np.zeros((4, 10, 10), np.int8)
    seg[:2] = 1
    seg[2, :5] = 2
    seg[3, 0, :5] = 2  # class 2: 55 voxels
    seg[3, 9, :3] = 3  # a 3-voxel speck: left out
    seg[3, 5, 5] = 4  # the ignore class (K = 4): never a class
    data = rng.normal(size=(2, 4, 10, 10)).astype(np.float32)
    data[0][seg == 1] += 5.0
    data[1] *= 3.0
    stats = class_intensity_stats(data, seg, num_classes=4)
    assert sorted(stats) == [1, 2] and 3 * 1 < MIN_CLASS_VOXELS
    for k in (1, 2):
        for c in range(2):
            values = data[c][seg == k].astype(np.float64)
            assert stats[k][c] == pytest.approx([values.mean(), values.std()], abs=1e-5)
    assert stats[1][0][0] > 4.0 and stats[1][1][1] > 2.0


def _props(means: list[float], stds: list[float], k: int = 1) -> list[CaseProperties]:
    geometry = ImageGeometry(
        shape=(4, 4, 4), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel())
    )
    return [
        CaseProperties(
            case_id=f"c{i}",
            geometry=geometry,
            bbox=((0, 4), (0, 4), (0, 4)),
            shape_after_crop=(4, 4, 4),
            shape_after_resample=(4, 4, 4),
            spacing_after_resample=(1.0, 1.0, 1.0),
            class_intensity={k: [[m, s]]},
        )
        for i, (m, s) in enumerate(zip(means, stds))
    ]


def test_homogeneous_contrast_turns_the_transforms_off_and_varied_contrast_keeps_them():
    n = MIN_CASES
    alike = decide_intensity_augmentation(_props([2.0 + 0.01 * i for i in range(n)], [0.5] * n))
    assert alike["intensity"] is False and alike["spread"] < HOMOGENEOUS_SPREAD and alike["cases"] == n
    varied = decide_intensity_augmentation(_props([1.0 + 0.3 * i for i in range(n)], [0.5] * n))
    assert varied["intensity"] is True and varied["spread"] >= HOMOGENEOUS_SPREAD
    # the spread is the across-case std of the means over the rms of the within-case stds
    means = [1.0 + 0.3 * i for i in range(n)]
    assert varied["spreads"]["1/0"] == pytest.approx(np.std(means, ddof=1) / 0.5, abs=1e-3)


def test_thin_evidence_keeps_nnunets_choice():
    few = decide_intensity_augmentation(_props([2.0] * (MIN_CASES - 1), [0.5] * (MIN_CASES - 1)))
    assert few["intensity"] is True and few["spread"] is None and few["spreads"] == {}
    old_cache = [CaseProperties(**{**p.__dict__, "class_intensity": {}}) for p in _props([2.0] * 12, [0.5] * 12)]
    assert decide_intensity_augmentation(old_cache)["intensity"] is True
    # a class held by too few cases is left out; the others decide
    mixed = _props([2.0 + 0.01 * i for i in range(12)], [0.5] * 12) + _props([9.0, 0.0], [0.5, 0.5], k=2)
    decision = decide_intensity_augmentation(mixed)
    assert list(decision["spreads"]) == ["1/0"] and decision["intensity"] is False


def _subset(src, dst, n: int, image_suffix: str) -> None:
    meta = json.loads((src / "dataset.json").read_text())
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    labels = sorted((src / "labelsTr").glob("*.nii.gz"))[:n]
    for lab in labels:
        case = lab.name[: -len(".nii.gz")]
        shutil.copy(src / "imagesTr" / f"{case}{image_suffix}.nii.gz", dst / "imagesTr")
        shutil.copy(lab, dst / "labelsTr")
    meta["numTraining"] = n
    meta.pop("training", None)
    meta.pop("test", None)
    (dst / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("dataset", "suffix", "expected"),
    [("hippocampus", "", False), ("chaos_t2", "_0000", True)],
)
def test_real_datasets(tmp_path, dataset, suffix, expected):
    """The preprocessed real cases carry the statistics, and the rule keeps the measured choices: hippocampus
    crops (one scanner) alike -> off, as before; CHAOS abdominal MRI varied -> on."""
    data = tmp_path / "data"
    _subset(shared_dataset(dataset), data, 12, suffix)
    work = tmp_path / "work"
    result = plan_and_preprocess(data, work, PlannerOptions(device="cpu"), configs=["3d_fullres"], num_workers=1)
    ids = list_preprocessed_cases(work, result.plan, "3d_fullres")
    props = [load_case_properties(work, result.plan, "3d_fullres", i) for i in ids]
    assert len(props) == 12 and all(p.class_intensity for p in props)
    decision = decide_intensity_augmentation(props)
    assert decision["intensity"] is expected, decision
    assert len(decision["spreads"]) == result.plan.num_classes - 1
