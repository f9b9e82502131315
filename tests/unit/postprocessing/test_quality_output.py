"""``quality.json`` and the uncertainty maps of ``medseg predict``: the entropy is zero where every member agrees,
calibrated probabilities, the verdict's reasons, every case listed (also skipped ones), shard parts merged."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from medseg.inference import predict_folder
from medseg.inference.case_output import FinishedCase
from medseg.inference.shards import Shard
from medseg.io.image import ImageGeometry, read_image, write_image
from medseg.postprocessing import QUALITY_FILE, QualityWriter, uncertainty_path
from medseg.postprocessing.calibration import apply_temperature
from medseg.postprocessing.quality_features import (
    NEAR_MARGIN,
    LabelVolumes,
    QualityModel,
    case_verdict,
    entropy_terms,
    label_features,
)
from tests.unit.inference.conftest import bright_box_image, threshold_predictor, write_oblique

SHAPE = (4, 6, 8)
GEOMETRY = ImageGeometry(SHAPE, (2.0, 1.0, 0.5), (1.0, -2.0, 3.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def hand_case(tmp_path, probs: np.ndarray, case_id: str = "c1", warnings: tuple[str, ...] = ()) -> FinishedCase:
    """A finished case of three labels (0, 1, 2) whose mean probabilities are ``probs`` (3, *SHAPE)."""
    reference = tmp_path / "in" / f"{case_id}_0000.nii.gz"
    if not reference.is_file():
        write_image(np.zeros(SHAPE, np.float32), GEOMETRY, reference)
    labels = np.asarray([0, 1, 2])[probs.argmax(0)]
    index = {0: 0, 1: 1, 2: 2}
    return FinishedCase(
        case_id,
        labels,
        GEOMETRY,
        (0, 1, 2),
        lambda label: probs[index[label]].astype(np.float32),
        tmp_path / "out" / f"{case_id}.nii.gz",
        reference,
        input_warnings=warnings,
    )


def agreeing_probs() -> np.ndarray:
    """Certain (one-hot) in z < 2, every class 1/3 in z >= 2."""
    probs = np.zeros((3, *SHAPE), np.float32)
    probs[0, :2], probs[1, :2, :3], probs[0, :2, :3] = 1.0, 1.0, 0.0
    probs[:, 2:] = 1.0 / 3.0
    return probs


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uncertainty_is_zero_where_members_agree(tmp_path, temperature):
    writer = QualityWriter(tmp_path / "out", {"calibration": {"temperature": temperature}}, uncertainty=True)
    writer(hand_case(tmp_path, agreeing_probs()))
    path = uncertainty_path(tmp_path / "out", "c1")
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkFloat32 and image.GetSpacing() == pytest.approx((0.5, 1.0, 2.0))
    assert image.GetOrigin() == pytest.approx(GEOMETRY.origin)
    entropy = read_image(path)[0]
    assert (entropy[:2] == 0).all() and entropy[2:] == pytest.approx(1.0, abs=1e-5)
    doc = json.loads((tmp_path / "out" / QUALITY_FILE).read_text())
    assert doc["cases"]["c1"]["uncertainty"] == "uncertainty/c1.nii.gz" and doc["temperature"] == temperature


def test_entropy_terms_give_the_entropy_of_calibrated_probabilities():
    rng = np.random.default_rng(3)
    p = rng.random((3, 50)).astype(np.float32)
    p /= p.sum(0)
    t = 1.7
    s0 = sum(entropy_terms(p[k], t)[0] for k in range(3))
    s1 = sum(entropy_terms(p[k], t)[1] for k in range(3))
    q = apply_temperature(p, t)
    direct = -(q * np.log(q)).sum(0)
    assert np.log(s0) - s1 / t / s0 == pytest.approx(direct, abs=1e-4)


def test_calibrated_probabilities_replace_the_saved_ones(tmp_path):
    probs = agreeing_probs()
    probs[:, 2:] = np.asarray([0.7, 0.2, 0.1])[:, None, None, None]
    case = hand_case(tmp_path, probs)
    writer = QualityWriter(tmp_path / "out", {"calibration": {"temperature": 2.0}}, save_probabilities=True)
    writer(case)
    with np.load(tmp_path / "out" / "c1.npz") as f:
        saved = f["probabilities"].astype(np.float32)
    assert saved == pytest.approx(apply_temperature(probs, 2.0), abs=2e-3)
    assert saved[0, 3, 0, 0] < 0.7  # softened


def test_verdict_reasons_and_schema(tmp_path):
    probs = agreeing_probs()
    probs[:, 2:] = 0.0
    probs[0, 2:] = 1.0  # label 2 absent everywhere; label 1 certain in a corner
    volumes = {"1": LabelVolumes(math.log(1e-3), 0.1, 1.0, 1), "2": LabelVolumes(0.0, 0.5, 1.0, 1)}
    model = QualityModel(review_below=0.5, volumes=volumes, source="cross-validation")
    writer = QualityWriter(tmp_path / "out", {"quality": model.to_dict()}, {1: "a", 2: "b"})
    writer(hand_case(tmp_path, probs, warnings=("spacing 5 mm is outside the training range",)))
    entry = json.loads((tmp_path / "out" / QUALITY_FILE).read_text())["cases"]["c1"]
    assert set(entry) >= {"score", "verdict", "reasons", "warnings", "labels"}
    assert entry["verdict"] == "review" and entry["warnings"] == ["spacing 5 mm is outside the training range"]
    text = " | ".join(entry["reasons"])
    assert "label 2 (b) is missing" in text and "label 1 (a): volume" in text and "input: spacing 5 mm" in text
    assert entry["labels"]["1"]["expected_dice"] == pytest.approx(1.0) and entry["labels"]["1"]["components"] == 1
    assert entry["labels"]["2"]["voxels"] == 0 and entry["score"] == pytest.approx(1.0)
    good = case_verdict({"1": {"voxels": 6, "volume_ml": 1.0, "components": 1, "expected_dice": 0.95}}, QualityModel())
    assert good["verdict"] == "ok" and good["reasons"] == [] and good["score"] == pytest.approx(0.95)
    low = case_verdict({"1": {"voxels": 6, "volume_ml": 1.0, "components": 1, "expected_dice": 0.3}}, QualityModel())
    assert low["verdict"] == "review" and "below" in low["reasons"][0]


@pytest.mark.parametrize("user, verdict", [(None, "ok"), (0.999, "review"), (0.3, "ok")])
def test_users_review_level_replaces_the_models_threshold(tmp_path, user, verdict):
    probs = agreeing_probs()  # label 1 certain in a corner, label 2 at 1/3 where it wins: score below 1
    model = QualityModel(review_below=0.2, source="cross-validation")
    writer = QualityWriter(tmp_path / "out", {"quality": model.to_dict()}, review_below=user)
    writer(hand_case(tmp_path, probs))
    doc = json.loads((tmp_path / "out" / QUALITY_FILE).read_text())
    entry = doc["cases"]["c1"]
    assert 0.2 < entry["score"] < 0.999 and entry["verdict"] == verdict
    assert doc["score_model"]["review_below"] == pytest.approx(0.2 if user is None else user)
    source = "cross-validation" if user is None else "user (--review-below)"
    assert doc["score_model"]["review_below_source"] == source
    # a lower user level un-flags a case the model's own threshold would review
    strict = QualityWriter(tmp_path / "strict", {"quality": QualityModel(review_below=0.99).to_dict()})
    lenient = QualityWriter(
        tmp_path / "lenient", {"quality": QualityModel(review_below=0.99).to_dict()}, review_below=0.1
    )
    for w in (strict, lenient):
        w(hand_case(tmp_path, probs))
    assert strict.cases["c1"]["verdict"] == "review" and lenient.cases["c1"]["verdict"] == "ok"


def test_every_case_listed_kept_on_rerun_and_shards_merged(tmp_path):
    folder = tmp_path / "in"
    for i in range(3):
        write_oblique(folder / f"case_{i}.nii.gz", bright_box_image(seed=i)[0])
    out = tmp_path / "out"
    part = QualityWriter(out, shard=Shard(0, 2))
    res = predict_folder(folder, out, threshold_predictor(), progress=False, case_hook=part)
    assert res.ok and (out / "quality.part-1-of-2.json").is_file() and not (out / QUALITY_FILE).exists()
    (out / "case_2.nii.gz").unlink()
    writer = QualityWriter(out)  # a plain run merges the part, keeps its cases
    assert sorted(writer.cases) == ["case_0", "case_1", "case_2"] and not (out / "quality.part-1-of-2.json").exists()
    res = predict_folder(folder, out, threshold_predictor(), progress=False, case_hook=writer)
    assert res.skipped == ["case_0", "case_1"] and writer.written == ["case_2"]
    (out / "extra.nii.gz").write_bytes((out / "case_0.nii.gz").read_bytes())
    assert writer.list_skipped(["case_0", "extra"]) == ["extra"]
    doc = json.loads((out / QUALITY_FILE).read_text())
    assert sorted(doc["cases"]) == ["case_0", "case_1", "case_2", "extra"]
    assert doc["cases"]["extra"]["verdict"] == "review" and doc["cases"]["extra"]["score"] is None
    for case in ("case_0", "case_2"):
        entry = doc["cases"][case]
        assert entry["verdict"] in ("ok", "review") and 0 <= entry["score"] <= 1 and "5" in entry["labels"]
        assert entry["labels"]["5"]["voxels"] > 0


def whole_grid_features(probs: np.ndarray, labels: np.ndarray, temperature: float, voxel_ml: float) -> dict:
    """The features as the quality hook computed them before it kept crops: every calibrated probability
    ``(K, Z, Y, X)`` on the whole grid, the entropy over all classes, :func:`label_features` on whole masks."""
    norm = s1 = None
    for p in probs:
        powered, weighted = entropy_terms(p, temperature)
        norm = powered if norm is None else norm + powered
        s1 = weighted if s1 is None else s1 + weighted
    norm = np.maximum(norm, np.float32(1e-30))
    entropy = np.log(norm) - s1 / np.float32(temperature) / norm
    entropy = np.clip(entropy / np.float32(math.log(len(probs))), 0.0, 1.0).astype(np.float32)
    return {
        str(k): label_features(labels == k, entropy_terms(probs[k], temperature)[0] / norm, entropy, voxel_ml, None)
        for k in range(1, len(probs))
    }


def smooth_probs(seed: int) -> np.ndarray:
    """Four classes ``(4, 16, 20, 24)``: background, two noisy balls (label 2 touches the grid's ``z = 0`` side) and
    a label that is nowhere the argmax (probable only near label 1's surface)."""
    rng = np.random.default_rng(seed)
    grid = np.indices((16, 20, 24)).astype(np.float64)
    logits = np.zeros((4, 16, 20, 24))
    for k, centre in ((1, (8, 8, 9)), (2, (0, 14, 16))):
        distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
        logits[k] = 2.0 * (3.5 - distance) + ndimage.gaussian_filter(rng.normal(size=distance.shape), 1) * 4
    logits[3] = np.minimum(logits[:3].max(0) - 0.3 - 4 * rng.random(logits[0].shape), logits[1] + 1)
    probs = np.exp(logits - logits.max(0))
    return (probs / probs.sum(0)).astype(np.float32)


@pytest.mark.parametrize(("temperature", "absent_somewhere_likely"), [(1.0, True), (1.6, True), (0.7, False)])
def test_one_pass_features_equal_the_whole_grid_ones(tmp_path, temperature, absent_somewhere_likely):
    probs = smooth_probs(5)
    if not absent_somewhere_likely:  # the absent label's calibrated probability stays below ABSENT_BELOW
        probs[-1] = np.minimum(probs[-1], 1e-3)
        probs /= probs.sum(0)
    labels = probs.argmax(0)
    assert set(np.unique(labels)) == {0, 1, 2} and (labels[0] > 0).any()  # a structure touching the grid's side
    calls: list[int] = []

    def probability(label: int) -> np.ndarray:
        calls.append(label)
        return probs[label].copy()

    box = ndimage.find_objects(labels)[0]  # label 1 lies well inside the grid: its features' box is a crop
    assert all(s.start >= NEAR_MARGIN + 1 and s.stop <= n - NEAR_MARGIN - 1 for s, n in zip(box, labels.shape))
    geometry = ImageGeometry(labels.shape, (1.5, 1.0, 0.8), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    reference = tmp_path / "c_0000.nii.gz"
    write_image(np.zeros(labels.shape, np.float32), geometry, reference)
    case = FinishedCase("c", labels, geometry, (0, 1, 2, 3), probability, tmp_path / "out" / "c.nii.gz", reference)
    QualityWriter(tmp_path / "out", {"calibration": {"temperature": temperature}})(case)
    assert sorted(calls) == [0, 1, 2, 3]  # each class's probability built once
    got = json.loads((tmp_path / "out" / QUALITY_FILE).read_text())["cases"]["c"]["labels"]
    want = whole_grid_features(probs, labels, temperature, 1.5 * 0.8 / 1000.0)
    assert set(got) == set(want) == {"1", "2", "3"}
    for label, features in want.items():
        for key, value in features.items():
            expected = value if value is None else pytest.approx(value, abs=1e-6, rel=1e-6)
            assert got[label][key] == expected, (label, key)
    assert got["3"]["voxels"] == 0 and got["3"]["expected_dice"] == (0.0 if absent_somewhere_likely else 1.0)


def test_separable_dilation_equals_the_iterated_full_connectivity_one():
    from medseg.postprocessing.quality_features import _dilate

    rng = np.random.default_rng(3)
    for shape in [(9, 11, 7), (1, 6, 6), (12, 10)]:
        for _ in range(10):
            mask = ndimage.binary_opening(rng.random(shape) < 0.3) | (rng.random(shape) < 0.03)
            structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
            for radius in (1, NEAR_MARGIN):
                expected = ndimage.binary_dilation(mask, structure, iterations=radius)
                assert np.array_equal(_dilate(mask, radius), expected)
