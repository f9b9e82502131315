"""The joint label-volume rule of the quality verdict on hand-made volume tables: a case whose labels are each
within 3 SD but jointly unlike the training cases is flagged, a typical one is not, too few training cases turn
the rule off, a missing label is left out, and models stored before the rule still load."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from medseg.fingerprint import CaseFingerprint, Fingerprint
from medseg.io.workdir import WorkDir
from medseg.postprocessing.quality_features import LabelVolumes, QualityModel, case_verdict
from medseg.postprocessing.quality_reference import reference_quality_model, training_volumes
from medseg.postprocessing.volume_distance import (
    MIN_EXTRA_CASES,
    QUANTILE,
    JointVolumes,
    fit_joint_volumes,
    volume_distance,
)


def correlated_table(n: int = 20) -> list[dict[str, float]]:
    """``n`` training cases whose labels 1 and 2 grow together (label 2 about a quarter of label 1, in ml) and
    label 3 varies on its own."""
    rng = np.random.default_rng(7)
    size = rng.normal(0.0, 0.3, n)
    return [
        {"1": 1000.0 * math.exp(s), "2": 250.0 * math.exp(s + e), "3": 40.0 * math.exp(f)}
        for s, e, f in zip(size, rng.normal(0.0, 0.05, n), rng.normal(0.0, 0.2, n))
    ]


def per_label(table: list[dict[str, float]]) -> dict[str, LabelVolumes]:
    """Each label's log-volume distribution of ``table``, as the fingerprint's would be."""
    out = {}
    for label in table[0]:
        logs = [math.log(case[label]) for case in table if case.get(label, 0) > 0]
        out[label] = LabelVolumes(float(np.mean(logs)), float(np.std(logs)), len(logs) / len(table), 1)
    return out


def features(volumes_ml: dict[str, float], model: QualityModel) -> dict[str, dict]:
    """The per-label features a prediction with these volumes (ml; 0 = missing) gets, with its z-scores."""
    out = {}
    for label, ml in volumes_ml.items():
        v = model.volumes[label]
        z = (math.log(ml) - v.log_mean) / v.log_std if ml > 0 else None
        out[label] = {"voxels": int(ml > 0), "volume_ml": ml, "components": int(ml > 0), "expected_dice": 0.95}
        out[label]["volume_z"] = z
    return out


def model_of(table: list[dict[str, float]], labels=("1", "2", "3")) -> QualityModel:
    return QualityModel(volumes=per_label(table), joint_volumes=fit_joint_volumes(table, labels))


def test_jointly_unlike_case_is_flagged_though_each_label_is_within_three_sd():
    table = correlated_table()
    model = model_of(table)
    v = model.volumes
    # label 1 large, label 2 small: each about 2.5 SD out, but the training cases never pull them apart
    odd = {
        "1": math.exp(v["1"].log_mean + 2.5 * v["1"].log_std),
        "2": math.exp(v["2"].log_mean - 2.5 * v["2"].log_std),
        "3": math.exp(v["3"].log_mean),
    }
    f = features(odd, model)
    f["1"]["name"] = "liver"
    assert all(abs(x["volume_z"]) < 3 for x in f.values())
    verdict = case_verdict(f, model)
    record = verdict["volume_distance"]
    assert record["labels"] == ["1", "2", "3"]
    assert record["threshold"] == pytest.approx(stats.chi2.ppf(QUANTILE, 3))
    assert record["mahalanobis2"] > record["threshold"]
    assert verdict["verdict"] == "review" and len(verdict["reasons"]) == 1
    assert verdict["reasons"][0].startswith("label volumes jointly unlike the training cases")
    assert verdict["reasons"][0].endswith("for labels 1 (liver), 2, 3)")
    # the same |z| along the training cases' own correlation is a large patient, not an error
    large = {"1": odd["1"], "2": math.exp(v["2"].log_mean + 2.5 * v["2"].log_std), "3": odd["3"]}
    assert case_verdict(features(large, model), model)["verdict"] == "ok"


def test_typical_cases_pass_and_the_distance_is_zero_at_the_mean():
    table = correlated_table()
    model = model_of(table)
    joint = model.joint_volumes
    assert joint is not None and joint.num_cases == len(table)
    at_mean = {label: math.exp(m) for label, m in zip(joint.labels, joint.mean)}
    assert volume_distance(features(at_mean, model), joint)["mahalanobis2"] == pytest.approx(0.0, abs=1e-9)
    for case in table:  # the training cases themselves: none reaches the 0.999 quantile
        verdict = case_verdict(features(case, model), model)
        assert verdict["verdict"] == "ok" and verdict["volume_distance"]["mahalanobis2"] < stats.chi2.ppf(QUANTILE, 3)


def test_rule_off_with_too_few_cases_or_labels():
    table = correlated_table()
    enough = len(["1", "2"]) + MIN_EXTRA_CASES
    assert fit_joint_volumes(table[: enough - 1], ["1", "2"]) is None
    assert fit_joint_volumes(table[:enough], ["1", "2"]).num_cases == enough
    assert fit_joint_volumes(table, ["1"]) is None  # one label: the per-label rule alone
    # cases lacking a label do not count towards the statistics
    holed = [dict(c, **({"2": 0.0} if i % 2 else {})) for i, c in enumerate(table[: enough + 2])]
    assert fit_joint_volumes(holed, ["1", "2"]) is None
    model = QualityModel(volumes=per_label(table), joint_volumes=None)
    verdict = case_verdict(features(table[0], model), model)
    assert verdict["volume_distance"] is None and verdict["verdict"] == "ok"


def test_missing_label_is_left_out_of_the_vector():
    table = correlated_table()
    model = model_of(table)
    case = dict(table[0], **{"2": 0.0})
    verdict = case_verdict(features(case, model), model)
    assert verdict["volume_distance"]["labels"] == ["1", "3"]
    assert verdict["volume_distance"]["threshold"] == pytest.approx(stats.chi2.ppf(QUANTILE, 2))
    assert any("label 2 is missing" in r for r in verdict["reasons"])
    only_one = dict(case, **{"3": 0.0})
    assert case_verdict(features(only_one, model), model)["volume_distance"] is None


def test_model_json_round_trip_and_old_json_loads():
    model = model_of(correlated_table())
    again = QualityModel.from_dict(model.to_dict())
    assert again == model and isinstance(again.joint_volumes, JointVolumes)
    old = model.to_dict()
    del old["joint_volumes"]  # a postprocessing.json written before the joint rule
    loaded = QualityModel.from_dict(old)
    assert loaded.joint_volumes is None and loaded.volumes == model.volumes
    assert case_verdict(features(correlated_table()[0], loaded), loaded)["volume_distance"] is None


def test_training_volumes_from_the_fingerprint(tmp_path):
    table = correlated_table(12)
    spacing = (2.0, 1.0, 0.5)  # 1 voxel = 1 microlitre
    cases = tuple(
        CaseFingerprint(
            case_id=f"case_{i:03d}",
            spacing=spacing,
            shape=(10, 20, 20),
            shape_after_crop=(10, 20, 20),
            relative_size_after_crop=1.0,
            # label 3 in only 10 of 12 cases: below 95 %, so not in the joint rule
            class_voxel_counts={int(k): round(ml * 1000) for k, ml in row.items() if k != "3" or i < 10},
            class_component_sizes={int(k): (round(ml * 1000),) for k, ml in row.items()},
        )
        for i, row in enumerate(table)
    )
    fingerprint = Fingerprint("t", ("mr",), (0, 1, 2, 3), cases, ())
    work = tmp_path / "work"
    work.mkdir()
    fingerprint.save(WorkDir(work).fingerprint)
    volumes, joint = training_volumes(work, (0, 1, 2, 3))
    logs = [math.log(round(row["1"] * 1000) / 1000) for row in table]
    assert volumes["1"].log_mean == pytest.approx(np.mean(logs)) and volumes["1"].log_std == pytest.approx(np.std(logs))
    assert volumes["3"].present_fraction == pytest.approx(10 / 12) and volumes["1"].present_fraction == 1.0
    assert joint is not None and joint.labels == ("1", "2") and joint.num_cases == 12
    assert joint.mean[0] == pytest.approx(np.mean(logs))
    model = reference_quality_model(work, (0, 1, 2, 3))
    assert model.source == "heuristic" and model.volumes == volumes and model.joint_volumes == joint
    assert training_volumes(tmp_path / "no_work", (0, 1)) == ({}, None)
