"""Ensemble rules on hand-made probability maps: mean, weighted mean, majority vote, stacking, cross-fitting."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.ensembling.combine import (
    Stacker,
    combine,
    cross_fitted,
    cross_validated_scores,
    fit_stacker,
    fit_weights,
    majority_vote,
    mean_probabilities,
    weighted_probabilities,
)
from medseg.errors import ConfigError


def _maps(*members):
    """``(M, K, V)`` from per-member lists of per-voxel class probabilities ``[[p0, p1, ...], ...]``."""
    return np.array([np.array(m, dtype=np.float64).T for m in members])


def test_mean_and_weighted_mean():
    probs = _maps([[0.8, 0.2], [0.4, 0.6]], [[0.2, 0.8], [0.6, 0.4]])
    assert np.allclose(mean_probabilities(probs), [[0.5, 0.5], [0.5, 0.5]])
    assert np.allclose(weighted_probabilities(probs, [1.0, 0.0]), probs[0])
    assert np.allclose(weighted_probabilities(probs, [3.0, 1.0]), [[0.65, 0.45], [0.35, 0.55]])  # 0.75 / 0.25
    for bad in ([1.0], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ConfigError, match="non-negative weights"):
            weighted_probabilities(probs, bad)


def test_majority_vote_is_a_relative_majority_with_ties_broken_by_the_mean_probability():
    probs = _maps(
        [[0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05]],
        [[0.1, 0.6, 0.3], [0.2, 0.1, 0.7], [0.8, 0.1, 0.1]],
        [[0.0, 0.0, 1.0], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1]],
    )
    # voxel 0: two votes for class 1 beat one confident vote for class 2 (the mean would pick class 2: 0.53 > 0.4)
    # voxel 1: one vote each for 0, 2 and 1: the tie goes to the highest mean, class 1 (0.4 vs 0.27 and 0.33)
    # voxel 2: unanimous
    assert mean_probabilities(probs).argmax(0)[0] == 2
    assert majority_vote(probs).tolist() == [1, 1, 0]
    # 5 members, votes 2 / 1 / 2 for classes 0 / 1 / 2: the tie of 0 and 2 goes to 0 (mean 0.26 vs 0.22), although
    # the untied class 1 has the highest mean (0.52)
    five = _maps(*([[[0.6, 0.4, 0.0]]] * 2 + [[[0.0, 0.45, 0.55]]] * 2 + [[[0.1, 0.9, 0.0]]]))
    assert mean_probabilities(five).argmax(0).tolist() == [1]
    assert majority_vote(five).tolist() == [0]
    assert combine("vote", probs).tolist() == [1, 1, 0] and combine("mean", probs).tolist() == [2, 1, 0]


def _noisy_cases(seed, n_cases=4, shape=(6, 8, 8)):
    """Cases of 2 classes with a good member (right with probability 0.9), a useless one (0.5 everywhere) and
    one that is confidently wrong (its class-1 probability is the good member's class-0 probability)."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n_cases):
        ref = (rng.random(shape) < 0.4).astype(np.int64)
        p1 = np.where(ref == 1, rng.uniform(0.6, 0.95, shape), rng.uniform(0.05, 0.4, shape))
        good = np.stack([1 - p1, p1])
        useless = np.full_like(good, 0.5)
        inverted = good[::-1].copy()
        cases.append((np.stack([good, useless, inverted]), ref))
    return cases


def test_fitted_weights_favour_the_member_that_explains_the_labels():
    cases = _noisy_cases(0)
    w = fit_weights(cases)
    assert w.shape == (3,) and w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert w[0] > 0.9 and w[2] < 0.01  # the inverted member gets (nearly) nothing
    probs, ref = cases[0]
    assert (combine("weighted", probs, weights=w) == ref).mean() == 1.0
    assert (combine("mean", probs) == ref).mean() < 0.9  # the inverted member cancels the good one


def test_stacking_learns_to_use_an_inverted_member_and_round_trips():
    train, test = _noisy_cases(1), _noisy_cases(2)
    only_inverted = [(probs[2:], ref) for probs, ref in train]
    stacker = fit_stacker(only_inverted)
    assert stacker.coef.shape == (2, 1) and (stacker.coef < 0).all()  # each class: the member's log-odds, negated
    for probs, ref in test:
        assert (combine("stacking", probs[2:], stacker=stacker) == ref).mean() == 1.0
        assert (combine("mean", probs[2:]) == ref).mean() == 0.0
    full = fit_stacker(train)
    probs, ref = test[0]
    out = full.probabilities(probs)
    assert out.shape == (2, 6, 8, 8) and np.allclose(out.sum(0), 1.0, atol=1e-5)
    assert (out.argmax(0) == ref).mean() == 1.0
    back = Stacker.from_dict(full.to_dict())
    assert np.array_equal(back.coef, full.coef) and np.array_equal(back.bias, full.bias)
    with pytest.raises(ConfigError, match="members"):
        full.probabilities(probs[:2])
    with pytest.raises(ConfigError, match="needs its fitted"):
        combine("stacking", probs)


def test_cross_fitting_never_fits_on_the_fold_it_scores():
    cases = {fold: _noisy_cases(fold, n_cases=2) for fold in range(3)}
    fitted = cross_fitted(cases, lambda fit_cases: {id(c) for c in fit_cases})  # which cases each fit saw
    assert set(fitted) == {0, 1, 2}
    for fold, ids in fitted.items():
        assert not ids & {id(c) for c in cases[fold]}
        assert ids == {id(c) for other in cases if other != fold for c in cases[other]}
    weights = cross_fitted(cases, fit_weights)
    assert all(w[0] > 0.9 for w in weights.values())
    with pytest.raises(ConfigError, match="two folds"):
        cross_fitted({0: cases[0]}, fit_weights)


def test_cross_validated_scores_rank_the_rules_on_cases_they_were_not_fitted_on():
    cases = {fold: _noisy_cases(10 + fold, n_cases=2) for fold in range(3)}
    scores = cross_validated_scores(cases, lambda labels, ref: float((labels == ref).mean()))
    assert set(scores) == {"mean", "weighted", "vote", "stacking"}
    assert scores["weighted"] == 1.0 and scores["stacking"] == 1.0  # they learn to drop or flip the bad members
    assert scores["mean"] < 0.9  # the inverted member cancels the good one
    # vote: good and inverted always disagree and the useless member votes 0, so class 0 wins every voxel
    ref_share = np.mean([(ref == 0).mean() for fold_cases in cases.values() for _, ref in fold_cases])
    assert scores["vote"] == pytest.approx(ref_share)


def test_stacking_stays_finite_beside_a_saturated_member():
    """A member whose probabilities are exactly 0 or 1 (an under-trained network: background everywhere but one
    slice) has log-odds at the clipping bounds; full Newton steps then diverged (intercepts ~1e12)."""
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(6):
        ref = np.zeros((6, 12, 12), np.int64)
        ref[1:5, 2:7, 2:7], ref[1:5, 7:11, 3:9] = 1, 2
        logits = 4.0 * np.eye(3)[ref].transpose(3, 0, 1, 2) + rng.normal(0, 1.5, (3, *ref.shape))
        good = np.exp(logits) / np.exp(logits).sum(0)
        flat = np.zeros_like(good)
        flat[0], flat[0, 0], flat[1, 0] = 1.0, 0.0, 1.0
        cases.append((np.stack([good, flat]).astype(np.float32), ref))
    stacker = fit_stacker(cases)
    assert np.isfinite(stacker.coef).all() and np.abs(stacker.bias).max() < 100
    stacked = np.mean([(combine("stacking", p, stacker=stacker) == r).mean() for p, r in cases])
    mean = np.mean([(combine("mean", p) == r).mean() for p, r in cases])
    assert stacked > 0.9 and stacked > mean
