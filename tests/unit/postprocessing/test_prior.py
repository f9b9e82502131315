"""Postprocessing decided from the training labels' component statistics, on hand-built statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.fingerprint import CaseFingerprint, Fingerprint
from medseg.postprocessing import apply_postprocessing, load_rules
from medseg.postprocessing.prior import (
    PRIOR_FILE,
    PRIOR_SOURCE,
    class_evidence,
    decide_class,
    ensemble_prior,
    is_prior,
    merge_priors,
    prior_rules,
    record_prior,
)


def _fingerprint(per_case: list[dict[int, tuple[int, ...]]], label_ids=(0, 1, 2), ignore_label=None) -> Fingerprint:
    cases = tuple(
        CaseFingerprint(
            case_id=f"case_{i:03d}",
            spacing=(3.0, 1.0, 1.0),
            shape=(10, 20, 20),
            shape_after_crop=(10, 20, 20),
            relative_size_after_crop=1.0,
            class_voxel_counts={k: sum(v) for k, v in comps.items()},
            class_component_sizes=comps,
        )
        for i, comps in enumerate(per_case)
    )
    return Fingerprint(
        dataset_name="t",
        channel_names=("mr",),
        label_ids=tuple(label_ids),
        cases=cases,
        intensity=(),
        ignore_label=ignore_label,
    )


def test_evidence_specks_do_not_veto_and_genuine_parts_do():
    ev = class_evidence([(1000,), (1000, 6, 3), (600, 400), (), (0,)])  # the last two: class absent
    assert ev.num_cases == 3
    assert ev.single_component_cases == 2  # 9 speck voxels are < 1 % of 1009
    assert ev.min_largest_share == pytest.approx(0.6)
    assert ev.needed_ratios == (pytest.approx(400 / 600), 1.0, 1.0)
    # many small genuine parts: the smallest one needed to reach 99 % of the voxels decides
    assert class_evidence([(50, 30, 10, 10)]).needed_ratios == (pytest.approx(0.2),)


@pytest.mark.parametrize(
    ("cases", "expected"),
    [
        ([(800,)] * 10, {"op": "largest_component"}),
        ([(800,)] * 9, None),  # thin evidence
        ([(800,)] * 19 + [(500, 400)], {"op": "largest_component"}),  # one case of 20 may break it
        ([(800,)] * 18 + [(500, 400)] * 2, {"op": "remove_small", "fraction": pytest.approx(1 / 3)}),  # 0.8 >= 2/3
        ([(500, 250)] * 12, {"op": "remove_small", "fraction": 0.2}),  # 0.5: 1/3 judged at 2/3 fails, 0.2 at 0.4 holds
        ([(500, 20)] * 12, None),  # genuine parts at 4 % of the largest: no threshold is safe
        ([(400, 400)] * 12, {"op": "remove_small", "fraction": 0.5}),  # two equal halves: never the largest alone
    ],
)
def test_decision(cases, expected):
    step, reason = decide_class(class_evidence(cases))
    assert step == expected, reason
    assert reason


def test_rules_from_a_fingerprint_per_class_with_evidence_and_case_selection():
    per_case = [{1: (900, 2), 2: (300, 280)} for _ in range(12)]
    per_case += [{1: (700,)}]  # label 2 absent: counted only where present
    fp = _fingerprint(per_case, label_ids=(0, 1, 2))
    rules = prior_rules(fp)
    assert is_prior(rules) and rules["source"] == PRIOR_SOURCE and rules["num_cases"] == 13
    assert rules["per_label"] == {"1": [{"op": "largest_component"}], "2": [{"op": "remove_small", "fraction": 1 / 3}]}
    assert rules["foreground_largest_component"] is False
    ev = rules["evidence"]
    assert ev["1"]["num_cases"] == 13 and ev["1"]["single_component_cases"] == 13
    assert ev["2"]["num_cases"] == 12 and ev["2"]["decision"] == "remove_small_0.3333"
    assert ev["2"]["needed_ratio_q05"] == pytest.approx(280 / 300, abs=1e-6)
    # a run's training cases only: 9 cases is too little evidence
    few = prior_rules(fp, [f"case_{i:03d}" for i in range(9)])
    assert few["per_label"] == {} and "fewer than 10" in few["evidence"]["1"]["reason"]
    with pytest.raises(MedsegError, match="case_999"):
        prior_rules(fp, ["case_999"])
    json.dumps(rules)  # plain JSON


def test_no_rule_for_region_plans_and_partial_annotation():
    per_case = [{1: (900,), 2: (300,)} for _ in range(12)]
    assert prior_rules(_fingerprint(per_case), region_based=True)["per_label"] == {}
    partial = prior_rules(_fingerprint(per_case, ignore_label=3))
    assert partial["per_label"] == {} and "ignore label" in partial["evidence"]["1"]["reason"]


def test_merge_takes_the_mildest_decision_every_run_supports():
    a = {
        "format": "medseg-postprocessing-v1",
        "source": PRIOR_SOURCE,
        "per_label": {
            "1": [{"op": "largest_component"}],
            "2": [{"op": "largest_component"}],
            "3": [{"op": "largest_component"}],
        },
    }
    b = {**a, "per_label": {"1": [{"op": "largest_component"}], "2": [{"op": "remove_small", "fraction": 0.2}]}}
    merged = merge_priors([a, b])
    assert merged["per_label"] == {"1": [{"op": "largest_component"}], "2": [{"op": "remove_small", "fraction": 0.2}]}
    assert merged["merged_from_runs"] == 2 and is_prior(merged)
    assert "merged_from_runs" not in merge_priors([a, a])


def test_recorded_rules_are_used_and_clean_a_stray_blob(tmp_path):
    work = tmp_path / "work"
    runs = [work / "runs" / "3d_fullres" / "unet" / f"fold_{k}" for k in (0, 1)]
    for r in runs:
        r.mkdir(parents=True)
    assert record_prior(work, runs[0]) is None and not (runs[0] / PRIOR_FILE).exists()  # no fingerprint
    assert ensemble_prior(work, runs)[0] is None
    _fingerprint([{1: (900,), 2: (300, 1)} for _ in range(12)]).save(work / "fingerprint.json")
    # a run without a record: decided now from every case of the fingerprint
    rules, source = ensemble_prior(work, runs)
    assert rules["per_label"] == {"1": [{"op": "largest_component"}], "2": [{"op": "largest_component"}]}
    assert "fingerprint.json" in source and "12" in source
    # recorded at the end of training: the records are what predict uses
    recorded = record_prior(work, runs[0], [f"case_{i:03d}" for i in range(10)])
    record_prior(work, runs[1], [f"case_{i:03d}" for i in range(2, 12)])
    assert load_rules(runs[0] / PRIOR_FILE) == recorded and recorded["num_cases"] == 10
    rules, source = ensemble_prior(work, runs)
    assert PRIOR_FILE in source and rules["per_label"] == recorded["per_label"]
    seg = np.zeros((8, 16, 16), np.uint8)
    seg[1:6, 2:9, 2:9] = 1
    seg[7, 14, 14] = 1  # a stray blob far away
    seg[1:4, 11:15, 2:6] = 2
    out = apply_postprocessing(seg, rules)
    assert out[7, 14, 14] == 0 and (out[1:6, 2:9, 2:9] == 1).all() and (out == 2).sum() == (seg == 2).sum()
