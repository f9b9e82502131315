"""Temperature scaling of averaged probabilities, its fit, the expected calibration error and relevant voxels."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.postprocessing.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    relevant_voxels,
)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_recovers_a_known_temperature(true_t):
    """Labels drawn from softmax(z / T0) while the model says softmax(z): the fit finds T0."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (3, 30000))
    truth = softmax(logits / true_t)
    targets = (rng.random(logits.shape[1])[None] > np.cumsum(truth, 0)).sum(0)
    fitted = fit_temperature([softmax(logits)], [targets])
    assert fitted == pytest.approx(true_t, rel=0.08)
    before = expected_calibration_error([softmax(logits)], [targets])
    after = expected_calibration_error([apply_temperature(softmax(logits), fitted)], [targets])
    assert after < before and after < 0.02


def test_apply_temperature_keeps_argmax_and_sums():
    p = softmax(np.random.default_rng(0).normal(0, 2, (4, 5, 6)))
    for t in (0.3, 1.0, 4.0):
        q = apply_temperature(p, t)
        assert np.allclose(q.sum(0), 1, atol=1e-5) and (q.argmax(0) == p.argmax(0)).all()
    assert apply_temperature(p, 4.0).max() < p.max()  # T > 1 softens
    one_hot = np.eye(3)[:, [0, 1, 2, 1]]
    assert np.array_equal(apply_temperature(one_hot, 3.0), one_hot)  # certainty stays certain


def test_ece_of_hand_made_confidences():
    targets = np.zeros(10, dtype=np.int64)
    certain = np.stack([np.ones(10), np.zeros(10)])
    assert expected_calibration_error([certain], [targets]) == 0.0
    nine = np.stack([np.full(10, 0.9), np.full(10, 0.1)])  # says 90 %, right every time
    assert expected_calibration_error([nine], [targets]) == pytest.approx(0.1)
    targets[:1] = 1  # now right 9 times in 10
    assert expected_calibration_error([nine], [targets]) == pytest.approx(0.0, abs=1e-12)
    assert fit_temperature([], []) == 1.0 and expected_calibration_error([], []) == 0.0


def test_relevant_voxels_is_a_margin_around_the_union():
    pred, ref = np.zeros((1, 1, 20), int), np.zeros((1, 1, 20), int)
    pred[0, 0, 5], ref[0, 0, 12] = 1, 2
    mask = relevant_voxels(pred, ref, margin=2)
    assert np.flatnonzero(mask[0, 0]).tolist() == [3, 4, 5, 6, 7, 10, 11, 12, 13, 14]
    assert not relevant_voxels(np.zeros_like(pred), np.zeros_like(ref)).any()
