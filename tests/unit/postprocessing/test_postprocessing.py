"""Postprocessing operations and the greedy per-label search, on hand-built masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.postprocessing import apply_postprocessing, fit_postprocessing, load_rules, save_rules
from medseg.postprocessing.operations import RULES_FORMAT


def _blob_scene() -> np.ndarray:
    seg = np.zeros((12, 20, 20), np.uint8)
    seg[2:8, 2:10, 2:10] = 1  # big true structure of label 1
    seg[9:11, 15:17, 15:17] = 1  # small spurious component of label 1
    seg[2:6, 12:18, 12:18] = 2  # label 2 touching nothing
    return seg


def test_largest_component_removes_spurious_blob_only():
    seg = _blob_scene()
    rules = {"format": RULES_FORMAT, "per_label": {"1": [{"op": "largest_component"}]}}
    out = apply_postprocessing(seg, rules)
    assert out.dtype == seg.dtype and out is not seg
    assert out[9:11, 15:17, 15:17].sum() == 0  # spurious blob -> background
    assert (out[2:8, 2:10, 2:10] == 1).all()
    np.testing.assert_array_equal(out == 2, seg == 2)  # other label untouched
    assert (seg[9:11, 15:17, 15:17] == 1).all()  # input not modified


def test_remove_small_keeps_components_above_fraction():
    seg = np.zeros((10, 30, 30), np.uint8)
    seg[0:5, 0:10, 0:10] = 3  # 500 voxels
    seg[0:5, 15:25, 0:4] = 3  # 200 voxels (0.4 of the largest)
    seg[7:9, 20:22, 20:25] = 3  # 20 voxels (0.04)
    out = apply_postprocessing(seg, {"per_label": {"3": [{"op": "remove_small", "fraction": 0.2}]}})
    assert (out == 3).sum() == 700
    out = apply_postprocessing(seg, {"per_label": {"3": [{"op": "remove_small", "fraction": 0.5}]}})
    assert (out == 3).sum() == 500


def test_diagonal_contact_is_one_component():
    seg = np.zeros((5, 5, 5), np.uint8)
    seg[1, 1, 1] = seg[2, 2, 2] = seg[4, 4, 4] = 1
    out = apply_postprocessing(seg, {"per_label": {"1": [{"op": "largest_component"}]}})
    assert out[1, 1, 1] == out[2, 2, 2] == 1 and out[4, 4, 4] == 0


def test_closing_fills_background_but_never_another_label():
    seg = np.zeros((9, 9, 9), np.uint8)
    seg[2:7, 2:7, 2:7] = 1
    seg[4, 4, 4] = 0  # hole -> filled
    seg[4, 2, 4] = 2  # another label inside the face of the cube: stays 2
    out = apply_postprocessing(seg, {"per_label": {"1": [{"op": "closing", "radius": 1}]}})
    assert out[4, 4, 4] == 1 and out[4, 2, 4] == 2
    opened = apply_postprocessing(np.pad(np.ones((1, 1, 1), np.uint8), 3), {"per_label": {"1": [{"op": "opening"}]}})
    assert opened.sum() == 0  # a lone voxel does not survive an opening


def test_foreground_largest_component():
    seg = _blob_scene()
    seg[2:6, 12:18, 12:18] = 0
    seg[2:6, 10:14, 4:8] = 2  # label 2 touches label 1's big structure
    out = apply_postprocessing(seg, {"foreground_largest_component": True})
    assert out[9:11, 15:17, 15:17].sum() == 0 and (out == 2).sum() == (seg == 2).sum()


def test_fit_removes_spurious_components_and_keeps_good_labels(tmp_path):
    rng = np.random.default_rng(0)
    cases = {}
    for i in range(4):
        ref = np.zeros((12, 24, 24), np.uint8)
        ref[2:8, 2:10, 2:10] = 1
        ref[2:6, 14:20, 14:20] = 2
        ref[8:10, 14:16, 2:4] = 2  # label 2 truly has a second, smaller part (1/9 of the first)
        pred = ref.copy()
        z, y = rng.integers(9, 11), rng.integers(12, 20)
        pred[z : z + 2, y : y + 2, 20:22] = 1  # spurious label-1 blob
        cases[f"c{i}"] = (pred, ref)
    rules = fit_postprocessing(list(cases), cases.__getitem__, [0, 1, 2], progress=False)
    assert rules["format"] == RULES_FORMAT
    steps1 = rules["per_label"]["1"]
    assert steps1[0]["op"] in ("largest_component", "remove_small")
    assert "2" not in rules["per_label"]  # removing label 2's small true part would hurt
    assert not rules["foreground_largest_component"]  # it would delete label 2's second part
    s = rules["scores"]
    assert s["dice_after"]["1"] == pytest.approx(1.0) and s["dice_before"]["1"] < 1.0
    assert s["dice_after"]["2"] == pytest.approx(1.0)
    for pred, ref in cases.values():
        np.testing.assert_array_equal(apply_postprocessing(pred, rules), ref)
    save_rules(rules, tmp_path / "pp.json")
    assert load_rules(tmp_path / "pp.json")["per_label"] == rules["per_label"]


def test_fit_leaves_perfect_predictions_alone():
    ref = np.zeros((8, 16, 16), np.uint8)
    ref[1:5, 1:6, 1:6] = 1
    ref[1:5, 9:14, 9:14] = 1  # two equal true components
    rules = fit_postprocessing(["a"], lambda _: (ref.copy(), ref), [0, 1], progress=False)
    assert rules["per_label"] == {} and not rules["foreground_largest_component"]


def test_load_rules_rejects_bad_files(tmp_path):
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(MedsegError, match="not a medseg postprocessing file"):
        load_rules(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"format": RULES_FORMAT, "per_label": {"1": [{"op": "explode"}]}}))
    with pytest.raises(MedsegError, match="unknown operation"):
        load_rules(tmp_path / "y.json")
    with pytest.raises(MedsegError, match="not found"):
        load_rules(tmp_path / "z.json")
