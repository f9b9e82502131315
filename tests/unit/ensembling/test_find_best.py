"""find_best on a hand-built work folder: ranking, ensembles, postprocessing, best.json."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest

from medseg.cli.main import main
from medseg.ensembling import find_best, find_trained_runs, find_validation_predictions
from medseg.errors import MedsegError
from medseg.io.image import ImageGeometry, write_image
from medseg.planning.plan import ConfigurationPlan, NormalizationSpec, Plan
from tests.helpers import network_plan

SHAPE = (6, 16, 16)
GEO = ImageGeometry(SHAPE, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def _plan() -> Plan:
    cfgs = {}
    for name, net in (
        ("3d_fullres", network_plan("unet", (4, 8, 8), 2, ((3, 3, 3),) * 2, ((1, 1, 1), (2, 2, 2)))),
        ("2d", network_plan("unet", (8, 8), 2, ((3, 3),) * 2, ((1, 1), (2, 2)))),
    ):
        cfgs[name] = ConfigurationPlan(
            name, net.dims, (2.0, 1.0, 1.0), SHAPE, (NormalizationSpec("zscore"),), {"unet": net}
        )
    return Plan("t", ("MRI",), (0, 1, 5), ("bg", "a", "b"), (2.0, 1.0, 1.0), SHAPE, cfgs).validate()


def _reference(i: int) -> np.ndarray:
    ref = np.zeros(SHAPE, np.uint8)
    ref[1:5, 2:8, 2:8] = 1
    ref[1:4, 10:14, 9 + i % 2 : 14] = 5
    return ref


def _onehot(seg_ids: np.ndarray, noise: float, seed: int) -> np.ndarray:
    idx = np.searchsorted([0, 1, 5], seg_ids)
    p = np.eye(3, dtype=np.float32)[idx].transpose(3, 0, 1, 2)
    p = p + np.random.default_rng(seed).uniform(0, noise, p.shape).astype(np.float32)
    return (p / p.sum(0, keepdims=True)).astype(np.float16)


def _save_npz(path: Path, probs: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, probabilities=probs)
    path.write_bytes(buf.getvalue())


@pytest.fixture
def work(tmp_path: Path) -> Path:
    work, data = tmp_path / "work", tmp_path / "data"
    work.mkdir()
    _plan().save(work / "plans.json")
    (work / "dataset_ref.json").write_text(json.dumps({"root": str(data)}))
    for i in range(6):
        case = f"case_{i}"
        ref = _reference(i)
        write_image(ref, GEO, data / "labelsTr" / f"{case}.nii.gz")
        fold = i % 2
        # 3d: perfect except a spurious label-1 blob; 2d: misses a slab of label 5 in every case
        pred3 = ref.copy()
        pred3[5, 12:14, 0:2] = 1
        pred2 = ref.copy()
        pred2[3, 10:14, 9:14] = 0
        _save_npz(
            work / "runs" / "3d_fullres" / "unet" / f"fold_{fold}" / "validation" / f"{case}.npz",
            _onehot(pred3, 0.3, i),
        )
        _save_npz(
            work / "runs" / "2d" / "unet" / f"fold_{fold}" / "validation" / f"{case}.npz", _onehot(pred2, 0.3, 100 + i)
        )
    (work / "runs" / "2d" / "unet" / "fold_0" / "checkpoint_final.pt").write_bytes(b"x")
    (work / "runs" / "2d" / "unet" / "fold_all").mkdir()
    (work / "runs" / "2d" / "unet" / "fold_all" / "checkpoint_final.pt").write_bytes(b"x")
    return work


def test_discovery(work):
    preds = find_validation_predictions(work)
    assert sorted(preds) == [("2d", "unet"), ("3d_fullres", "unet")]
    assert len(preds[("2d", "unet")]) == 6
    assert list(find_trained_runs(work, "2d", "unet")) == ["fold_0", "fold_all"]
    assert find_trained_runs(work, "3d_fullres", "unet") == {}


def test_find_best_ranks_fits_postprocessing_and_saves(work):
    res = find_best(work, progress=False)
    names = [n for n, _ in res.ranking]
    assert len(names) == 3 and set(names) == {"2d/unet", "3d_fullres/unet", "2d/unet + 3d_fullres/unet"}
    scores = dict(res.ranking)
    assert res.members == [("3d_fullres", "unet")]
    assert scores["3d_fullres/unet"] > scores["2d/unet"]
    assert res.folds == [0, 1] and res.num_cases == 6
    # the spurious blob (4 voxels, 0.008 mL) goes with the first candidate minimum volume: half the smallest
    # reference component of label 1 (144 voxels of 2 mm^3); the larger candidates only tie with it
    assert res.postprocessing["per_label"]["1"] == [{"op": "min_volume", "ml": pytest.approx(0.144)}]
    assert res.score_postprocessed == pytest.approx(1.0)
    assert res.score < 1.0
    best = json.loads((work / "best.json").read_text())
    assert best["members"] == [{"configuration": "3d_fullres", "arch": "unet"}]
    assert best["configs"] == ["3d_fullres"] and best["folds"] == [0, 1]
    pp = json.loads((work / "postprocessing.json").read_text())
    assert pp["fitted_on"]["members"] == [["3d_fullres", "unet"]]
    assert "medseg predict" in res.predict_command and str(work) in res.predict_command
    assert "3d_fullres/unet" in res.summary()


def test_ranking_uses_only_cases_every_candidate_has(work):
    for p in (work / "runs" / "2d" / "unet" / "fold_1" / "validation").glob("*.npz"):
        p.unlink()
    res = find_best(work, progress=False)
    assert res.num_cases == 3


def test_errors(tmp_path, work):
    (tmp_path / "w2").mkdir()
    _plan().save(tmp_path / "w2" / "plans.json")
    with pytest.raises(MedsegError, match="no cross-validation predictions"):
        find_best(tmp_path / "w2", progress=False)
    for p in (work / "runs" / "2d" / "unet" / "fold_0" / "validation").glob("*.npz"):
        p.unlink()
    for p in (work / "runs" / "3d_fullres" / "unet" / "fold_1" / "validation").glob("*.npz"):
        p.unlink()
    with pytest.raises(MedsegError, match="no case has a validation prediction from every"):
        find_best(work, progress=False)


def test_find_best_by_a_lesion_wise_metric_ranks_and_fits_postprocessing_by_it(work):
    # 3d: perfect voxels but a false label-1 lesion per case (lesion F1 2/3); 2d: a thinner label 5, no false lesion
    res = find_best(work, progress=False, metric="lesion_f1")
    scores = dict(res.ranking)
    assert res.metric == "lesion_f1" and res.members == [("2d", "unet")]
    assert scores["2d/unet"] == pytest.approx(1.0) and scores["3d_fullres/unet"] == pytest.approx((2 / 3 + 1) / 2)
    assert find_best(work, progress=False).members == [("3d_fullres", "unet")]  # Dice prefers 3d
    best = json.loads((work / "best.json").read_text())
    assert "metric" not in best and "mean_foreground_dice" in best["ranking"][0]  # Dice: best.json as before
    assert main(["find-best", str(work), "--metric", "lesion_dice", "-q"]) == 0
    assert json.loads((work / "best.json").read_text())["metric"] == "lesion_dice"


def test_postprocessing_is_fitted_to_the_lesion_wise_metric(work):
    for p in (work / "runs" / "2d").rglob("*.npz"):  # only 3d left: its false lesions are removed
        p.unlink()
    res = find_best(work, progress=False, metric="pq")
    assert res.score == pytest.approx((2 / 3 + 1) / 2) and res.score_postprocessed == pytest.approx(1.0)
    # the spurious blob (4 voxels, 0.008 mL) goes with the first candidate minimum volume: half the smallest
    # reference component of label 1 (144 voxels of 2 mm^3); the larger candidates only tie with it
    assert res.postprocessing["per_label"]["1"] == [{"op": "min_volume", "ml": pytest.approx(0.144)}]
    assert res.postprocessing["scores"]["metric"] == "pq"
    assert res.postprocessing["scores"]["pq_after"]["1"] == pytest.approx(1.0)
    best = json.loads((work / "best.json").read_text())
    assert best["metric"] == "pq" and best["metric_per_label"]["1"] == pytest.approx(2 / 3)
    assert "mean foreground pq" in res.summary()


def test_region_plan_ranks_by_the_lesion_wise_metric_of_each_region(tmp_path):
    work, data = tmp_path / "work", tmp_path / "data"
    work.mkdir()
    plan = dataclasses.replace(_plan(), regions=((1, 5), (5,)), regions_class_order=(1, 5)).validate()
    plan.save(work / "plans.json")
    (work / "dataset_ref.json").write_text(json.dumps({"root": str(data)}))
    for i in range(4):
        ref = _reference(i)
        write_image(ref, GEO, data / "labelsTr" / f"c{i}.nii.gz")
        pred = ref.copy()
        pred[5, 12:14, 0:2] = 1  # a false lesion of region (1, 5), which has 2 reference lesions
        probs = np.stack([np.isin(pred, r) for r in plan.regions]).astype(np.float16)
        _save_npz(work / "runs" / "3d_fullres" / "unet" / f"fold_{i % 2}" / "validation" / f"c{i}.npz", probs)
    res = find_best(work, progress=False, metric="lesion_f1")
    assert res.metric_per_label == {"(1, 5)": pytest.approx(0.8), "5": 1.0}  # F1 = 2 x 2 / (2 x 2 + 1)
    assert res.score == pytest.approx(0.9) and res.dice_per_label["5"] == 1.0


def test_find_best_fits_a_temperature_and_the_quality_score(work):
    """The fixture's probabilities are under-confident (one-hot plus noise, nearly always right): T < 1."""
    find_best(work, progress=False)
    pp = json.loads((work / "postprocessing.json").read_text())
    calibration, quality = pp["calibration"], pp["quality"]
    assert calibration["temperature"] < 1.0 and calibration["num_cases"] == 6
    assert calibration["ece_after"] < calibration["ece_before"]
    assert quality["source"] == "cross-validation" and quality["fit"]["num_cases"] == 6
    assert 0.5 <= quality["review_below"] < quality["fit"]["median_real_dice"]
    assert quality["volumes"] == {}  # no fingerprint in the work folder
