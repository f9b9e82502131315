"""The minimum component volume (mL at each case's spacing): the operation, its rules format and its fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.postprocessing import apply_postprocessing, fit_postprocessing, load_rules, save_rules
from medseg.postprocessing.fit import describe_rules
from medseg.postprocessing.operations import RULES_FORMAT, RulesPostprocess, voxel_ml
from medseg.postprocessing.volume_fit import DEFAULT_VOLUME_QUANTILES, volume_candidates


def _speck_scene() -> np.ndarray:
    seg = np.zeros((16, 24, 24), np.uint8)
    seg[1:11, 1:11, 1:11] = 1  # 1000 voxels
    seg[13:15, 15:20, 15:20] = 1  # a 50-voxel speck: 0.05 mL at 1 mm, 2 mL at 4 x 2.5 x 4 mm
    seg[1:4, 14:20, 14:20] = 2  # another label, small too
    return seg


def test_min_volume_removes_a_speck_at_1_mm_and_keeps_it_where_it_is_2_ml():
    seg = _speck_scene()
    rules = {"format": RULES_FORMAT, "per_label": {"1": [{"op": "min_volume", "ml": 0.1}]}}
    fine = apply_postprocessing(seg, rules, (1.0, 1.0, 1.0))
    assert 50 * voxel_ml((1.0, 1.0, 1.0)) == pytest.approx(0.05)
    assert not fine[13:15, 15:20, 15:20].any()  # 0.05 mL < 0.1 mL: relabelled to background
    assert (fine[1:11, 1:11, 1:11] == 1).all()  # 1 mL: kept
    np.testing.assert_array_equal(fine == 2, seg == 2)  # only its own label changes
    coarse_spacing = (4.0, 2.5, 4.0)
    assert 50 * voxel_ml(coarse_spacing) == pytest.approx(2.0)
    np.testing.assert_array_equal(apply_postprocessing(seg, rules, coarse_spacing), seg)
    # the predictor's callable passes the case's spacing the same way
    np.testing.assert_array_equal(RulesPostprocess(rules)(seg, (1.0, 1.0, 1.0)), fine)
    np.testing.assert_array_equal(RulesPostprocess(rules)(seg, coarse_spacing), seg)


def test_min_volume_needs_the_spacing_and_the_other_rules_do_not():
    seg = _speck_scene()
    with pytest.raises(ValueError, match="spacing"):
        apply_postprocessing(seg, {"per_label": {"1": [{"op": "min_volume", "ml": 0.1}]}})
    with pytest.raises(ValueError, match="does not fit"):
        apply_postprocessing(seg, {"per_label": {"1": [{"op": "min_volume", "ml": 0.1}]}}, (1.0, 1.0))
    out = apply_postprocessing(seg, {"per_label": {"1": [{"op": "largest_component"}]}})  # an old rules file
    assert not out[13:15, 15:20, 15:20].any()


def test_rules_files_with_min_volume_round_trip_and_bad_volumes_are_refused(tmp_path):
    rules = {"format": RULES_FORMAT, "per_label": {"1": [{"op": "min_volume", "ml": 0.25}]}}
    save_rules(rules, tmp_path / "pp.json")
    assert load_rules(tmp_path / "pp.json")["per_label"] == rules["per_label"]
    assert describe_rules(rules) == "label 1: min_volume_0.25ml"
    for bad in (-1.0, "x", None, float("inf")):
        doc = {"format": RULES_FORMAT, "per_label": {"1": [{"op": "min_volume", "ml": bad}]}}
        (tmp_path / "bad.json").write_text(json.dumps(doc))
        with pytest.raises(MedsegError, match="min_volume needs a volume"):
            load_rules(tmp_path / "bad.json")


def test_volume_candidates_are_half_the_smallest_and_low_quantiles():
    volumes = [1.6, 0.1, 0.8, 0.2, 0.4]
    got = volume_candidates(volumes, DEFAULT_VOLUME_QUANTILES)
    expected = sorted({0.05, *(float(np.quantile(volumes, q)) for q in DEFAULT_VOLUME_QUANTILES)})
    assert got == pytest.approx(expected)
    assert got[0] == pytest.approx(0.05) and got[1] == pytest.approx(0.1)  # half the smallest, the smallest
    assert got[-1] == pytest.approx(0.2)  # the 25 % quantile of five volumes: the second smallest
    assert volume_candidates([], DEFAULT_VOLUME_QUANTILES) == []


def _lesion_cases(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
    """Label 1: true lesions of 27-1000 voxels, predicted exactly, plus 1-2 voxel false specks; label 2: a large
    and a small true lesion, predicted exactly (its small lesion is real, removing it hurts)."""
    cases = {}
    for i, spacing in enumerate([(1.0, 1.0, 1.0), (2.0, 0.8, 0.8), (3.0, 1.2, 1.2), (1.5, 1.0, 1.0)]):
        ref = np.zeros((20, 32, 32), np.uint8)
        ref[1:11, 1:11, 1:11] = 1  # 1000 voxels: remove_small 0.05 (50 voxels) would drop the small lesions
        ref[14:17, 2:5, 2:5] = 1  # 27 voxels
        ref[14:18, 8:12, 8:12] = 1  # 64 voxels
        ref[2:10, 16:24, 16:24] = 2
        ref[14:16, 26:28, 26:28] = 2  # 8 voxels, a true small lesion of label 2
        pred = ref.copy()
        for _ in range(3):
            z, y, x = rng.integers(12, 19), rng.integers(14, 24), rng.integers(14, 24)
            pred[z, y, x : x + int(rng.integers(1, 3))] = 1  # false specks of 1-2 voxels
        cases[f"c{i}"] = (pred, ref, spacing)
    return cases


@pytest.mark.parametrize("metric", ["dice", "lesion_f1"])
def test_fit_keeps_a_min_volume_only_where_it_helps(metric):
    cases = _lesion_cases(np.random.default_rng(0))
    rules = fit_postprocessing(
        list(cases),
        lambda c: cases[c][:2],
        [0, 1, 2],
        progress=False,
        metric=metric,
        spacing_of=lambda c: cases[c][2],
        use_morphology=False,
    )
    steps = rules["per_label"]["1"]
    assert [s["op"] for s in steps] == ["min_volume"]
    smallest_true_ml = min(27 * voxel_ml(sp) for _, _, sp in cases.values())
    assert 0 < steps[0]["ml"] <= smallest_true_ml  # a candidate derived from the references
    assert "2" not in rules["per_label"]  # nothing to remove there: no step
    assert any(k.startswith("min_volume_") for k in rules["candidates"]["2"])  # it was tried
    assert rules["candidates"]["1"]["none"] == pytest.approx(rules["scores"][f"{metric}_before"]["1"])
    scores = rules["scores"]
    assert scores[f"{metric}_after"]["1"] == pytest.approx(1.0) and scores[f"{metric}_before"]["1"] < 0.999
    for pred, ref, spacing in cases.values():
        np.testing.assert_array_equal(apply_postprocessing(pred, rules, spacing), ref)


def test_fit_without_spacings_tries_no_min_volume():
    cases = _lesion_cases(np.random.default_rng(1))
    rules = fit_postprocessing(list(cases), lambda c: cases[c][:2], [0, 1, 2], progress=False, use_morphology=False)
    assert all(s["op"] != "min_volume" for steps in rules["per_label"].values() for s in steps)
    assert not any(k.startswith("min_volume_") for k in rules["candidates"]["1"])
