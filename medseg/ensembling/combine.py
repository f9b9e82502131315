"""Rules that combine the probability maps of an ensemble's members into one segmentation.

Four rules (:class:`~medseg.options.EnsembleMethod`):

- ``mean``: the mean of the members' softmax probabilities (what ``medseg predict`` does today);
- ``weighted``: a weighted mean, the weights those of the mixture of the members' probabilities most likely
  to have produced the reference labels (:func:`fit_weights`, maximum likelihood by EM; convex, so one optimum);
- ``vote``: majority vote of the members' argmax labels, the relative majority winning (with 5 members,
  2 votes can win), ties broken by the highest mean probability (:func:`majority_vote`);
- ``stacking``: a per-class logistic regression on the members' log-odds of that class (:class:`Stacker`,
  :func:`fit_stacker`; Newton steps with a small L2 penalty), the classes' scores normalised to sum to 1.

The fitted rules are fitted on out-of-fold predictions only (``validation/<case>.npz`` of each run, predicted
by the network that did not train on the case); to *score* a fitted rule on the same cross-validation,
:func:`cross_fitted` fits it once per fold on the other folds' cases, so no case is scored by a rule that
saw it; :func:`cross_validated_scores` scores every rule so. A member here is what has out-of-fold predictions: a (configuration, architecture) of find-best,
whose probabilities at prediction time are the mean over its folds (or snapshots).

Layouts: a case's members' probabilities ``(M, K, *spatial)`` (float, each member's ``K`` classes summing to
1), reference labels ``(*spatial)`` of class indices ``0 .. K-1``; results ``(K, *spatial)`` probabilities or
``(*spatial)`` labels (int64). Fitting uses the voxels where a member or the reference has foreground (where
the rules differ; the background far away would swamp the fit), at most ``max_voxels`` of them drawn at random.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from medseg.errors import ConfigError
from medseg.options import EnsembleMethod

#: A case for fitting: its members' probabilities ``(M, K, *spatial)`` and reference labels ``(*spatial)``.
Case = tuple[np.ndarray, np.ndarray]
#: Probabilities are clipped to ``[EPS, 1 - EPS]`` before a logarithm.
EPS = 1e-6
#: Voxels a fit uses at most (drawn at random from the voxels of every case where a member or the reference
#: has foreground).
MAX_VOXELS = 500_000
F = TypeVar("F")


def mean_probabilities(probs: np.ndarray) -> np.ndarray:
    """The members' mean: ``(M, K, *spatial)`` -> ``(K, *spatial)`` float32."""
    return np.asarray(probs, dtype=np.float32).mean(axis=0)


def weighted_probabilities(probs: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """The members' weighted mean: ``(M, K, *spatial)`` and ``M`` weights (>= 0, normalised here) ->
    ``(K, *spatial)`` float32.

    Raises:
        ConfigError: not one weight per member, a negative weight, or all weights 0.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (probs.shape[0],) or (w < 0).any() or not w.sum() > 0:
        raise ConfigError(f"need {probs.shape[0]} non-negative weights, not all 0; got {w.tolist()}")
    w = w / w.sum()
    return np.tensordot(w, np.asarray(probs, dtype=np.float64), axes=1).astype(np.float32)


def majority_vote(probs: np.ndarray) -> np.ndarray:
    """Labels by relative majority of the members' argmax labels; among the classes with the most votes, the
    one of the highest mean probability wins: ``(M, K, *spatial)`` -> ``(*spatial)`` int64."""
    num_classes = probs.shape[1]
    member_labels = np.asarray(probs).argmax(axis=1)  # (M, *spatial)
    votes = np.stack([(member_labels == k).sum(axis=0) for k in range(num_classes)])  # (K, *spatial)
    tied = votes == votes.max(axis=0, keepdims=True)
    return np.where(tied, mean_probabilities(probs), -1.0).argmax(axis=0)


def _fit_voxels(cases: Sequence[Case], max_voxels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The members' probabilities ``(M, K, N)`` and labels ``(N,)`` of the voxels a fit uses (module docstring)."""
    if not cases:
        raise ConfigError("fitting an ensemble rule needs at least one case with out-of-fold predictions")
    feats, labels = [], []
    for probs, ref in cases:
        if probs.shape[2:] != ref.shape:
            raise ConfigError(f"probabilities {probs.shape} do not match the labels {ref.shape}")
        region = (ref > 0) | (probs.argmax(axis=1) > 0).any(axis=0)
        feats.append(probs[:, :, region].astype(np.float64))
        labels.append(ref[region].astype(np.int64))
    x, y = np.concatenate(feats, axis=2), np.concatenate(labels)
    if y.size > max_voxels:
        keep = np.sort(np.random.default_rng(seed).choice(y.size, size=max_voxels, replace=False))
        x, y = x[:, :, keep], y[keep]
    return x, y


def fit_weights(
    cases: Sequence[Case], iterations: int = 200, tol: float = 1e-7, max_voxels: int = MAX_VOXELS, seed: int = 0
) -> np.ndarray:
    """Member weights of the weighted mean, fitted by maximum likelihood: the mixture ``sum_m w_m p_m`` of the
    members' probabilities that gives the reference labels the highest probability (EM updates
    ``w_m <- mean_voxels(w_m p_m(y) / sum_j w_j p_j(y))``, from equal weights).

    Args:
        cases: out-of-fold ``(probabilities (M, K, *spatial), labels (*spatial))`` of each case.
        iterations / tol: at most this many EM updates; stop when no weight moves more than ``tol``.
        max_voxels / seed: the voxels used (module docstring).

    Returns:
        ``(M,)`` weights, >= 0, summing to 1 (equal when there are no voxels to fit on).

    Raises:
        ConfigError: no cases, or probabilities that do not match their labels.
    """
    x, y = _fit_voxels(cases, max_voxels, seed)
    members = x.shape[0]
    w = np.full(members, 1.0 / members)
    if y.size == 0:
        return w
    p_true = np.take_along_axis(x, y[None, None, :], axis=1)[:, 0, :] + EPS  # (M, N)
    for _ in range(iterations):
        resp = w[:, None] * p_true / (w @ p_true)[None, :]
        new = resp.mean(axis=1)
        done = np.abs(new - w).max() < tol
        w = new
        if done:
            break
    return w / w.sum()


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` without overflow for large ``|z|``."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass(frozen=True)
class Stacker:
    """A per-class logistic regression on the members' log-odds of that class.

    Attributes:
        coef: ``(K, M)`` weight of member ``m``'s log-odds in class ``k``'s score.
        bias: ``(K,)`` intercepts.
    """

    coef: np.ndarray
    bias: np.ndarray

    def probabilities(self, probs: np.ndarray) -> np.ndarray:
        """``(M, K, *spatial)`` -> ``(K, *spatial)`` float32: each class's logistic score, normalised over the
        classes to sum to 1."""
        if probs.shape[:2] != (self.coef.shape[1], self.coef.shape[0]):
            raise ConfigError(f"the stacker was fitted on {self.coef.shape[1]} members x {self.coef.shape[0]} classes")
        z = np.einsum("km,mk...->k...", self.coef, _logit(np.asarray(probs, dtype=np.float64)))
        z += self.bias.reshape((-1,) + (1,) * (probs.ndim - 2))
        scores = _sigmoid(z) + EPS
        return (scores / scores.sum(axis=0, keepdims=True)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"coef": [[...]], "bias": [...]}``."""
        return {"coef": self.coef.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stacker:
        """Inverse of :meth:`to_dict`."""
        coef, bias = np.asarray(d["coef"], dtype=np.float64), np.asarray(d["bias"], dtype=np.float64)
        if coef.ndim != 2 or bias.shape != (coef.shape[0],):
            raise ConfigError(f"a stacker needs coef (K, M) and bias (K,), got {coef.shape} and {bias.shape}")
        return cls(coef, bias)


def _penalised_loss(design: np.ndarray, target: np.ndarray, penalty: np.ndarray, beta: np.ndarray) -> float:
    """Logistic loss of ``target`` (0/1 per voxel) under ``sigmoid(design @ beta)``, plus ``beta' P beta / 2``."""
    z = design @ beta
    return float(np.sum(np.logaddexp(0.0, z) - target * z) + 0.5 * beta @ penalty @ beta)


def fit_stacker(
    cases: Sequence[Case], l2: float = 1e-2, iterations: int = 30, max_voxels: int = MAX_VOXELS, seed: int = 0
) -> Stacker:
    """Fit a :class:`Stacker` on out-of-fold predictions: for each class, Newton steps on the logistic loss of
    "voxel is this class" against the members' log-odds of the class, from the plain mean of the log-odds.
    Each step is halved until the penalised loss does not rise (a member whose probabilities saturate at
    0 / 1 makes the Hessian nearly singular, and full Newton steps then diverge).

    Args:
        cases: out-of-fold ``(probabilities (M, K, *spatial), labels (*spatial))`` of each case.
        l2: penalty on the coefficients (not the intercept), per voxel.
        iterations: Newton steps at most per class (stops earlier when a step changes nothing).
        max_voxels / seed: the voxels used (module docstring).

    Raises:
        ConfigError: no cases, or probabilities that do not match their labels.
    """
    x, y = _fit_voxels(cases, max_voxels, seed)
    members, classes, n = x.shape
    coef, bias = np.full((classes, members), 1.0 / members), np.zeros(classes)
    if n == 0:
        return Stacker(coef, bias)
    penalty = np.diag([0.0] + [l2 * n] * members)
    for k in range(classes):
        design = np.concatenate([np.ones((n, 1)), _logit(x[:, k, :]).T], axis=1)  # (N, 1 + M)
        target = (y == k).astype(np.float64)
        beta = np.concatenate([[0.0], coef[k]])
        current = _penalised_loss(design, target, penalty, beta)
        for _ in range(iterations):
            p = _sigmoid(design @ beta)
            grad = design.T @ (p - target) + penalty @ beta
            hess = (design * (p * (1.0 - p))[:, None]).T @ design + penalty + 1e-9 * np.eye(members + 1)
            step = np.linalg.solve(hess, grad)
            scale = 1.0
            while scale > 1e-6 and _penalised_loss(design, target, penalty, beta - scale * step) > current:
                scale *= 0.5
            beta = beta - scale * step
            current = _penalised_loss(design, target, penalty, beta)
            if np.abs(scale * step).max() < 1e-8:
                break
        bias[k], coef[k] = beta[0], beta[1:]
    return Stacker(coef, bias)


def cross_fitted(
    cases_by_fold: Mapping[Hashable, Sequence[Case]], fit: Callable[[Sequence[Case]], F]
) -> dict[Hashable, F]:
    """For each fold, the rule ``fit`` fits on the cases of every *other* fold: scoring fold ``f``'s cases with
    ``result[f]`` scores a fitted rule on cases it never saw.

    Raises:
        ConfigError: fewer than two folds (a rule would be fitted on the cases it is scored on).
    """
    if len(cases_by_fold) < 2:
        raise ConfigError("cross-fitting needs the out-of-fold predictions of at least two folds")
    return {
        fold: fit([case for other, cases in cases_by_fold.items() if other != fold for case in cases])
        for fold in cases_by_fold
    }


def combine(
    method: EnsembleMethod | str,
    probs: np.ndarray,
    weights: Sequence[float] | np.ndarray | None = None,
    stacker: Stacker | None = None,
) -> np.ndarray:
    """Labels ``(*spatial)`` (int64) of one case by ``method``, from its members' ``(M, K, *spatial)``
    probabilities; ``weighted`` needs ``weights`` (:func:`fit_weights`), ``stacking`` a ``stacker``
    (:func:`fit_stacker`).

    Raises:
        ConfigError: an unknown method, or the fitted rule it needs is missing.
    """
    if method == EnsembleMethod.MEAN:
        return mean_probabilities(probs).argmax(axis=0)
    if method == EnsembleMethod.VOTE:
        return majority_vote(probs)
    if method == EnsembleMethod.WEIGHTED and weights is not None:
        return weighted_probabilities(probs, weights).argmax(axis=0)
    if method == EnsembleMethod.STACKING and stacker is not None:
        return stacker.probabilities(probs).argmax(axis=0)
    raise ConfigError(f"ensemble method {method!r} needs its fitted weights or stacker (or is unknown)")


def cross_validated_scores(
    cases_by_fold: Mapping[Hashable, Sequence[Case]], score: Callable[[np.ndarray, np.ndarray], float]
) -> dict[EnsembleMethod, float]:
    """Each rule's mean ``score`` over every case, the fitted rules cross-fitted (:func:`cross_fitted`): what
    find-best would report per rule for an ensemble whose members have out-of-fold predictions.

    Args:
        cases_by_fold: out-of-fold ``(probabilities (M, K, *spatial), labels (*spatial))`` of each case, by the
            fold that held the case out (two folds at least).
        score: ``score(predicted labels, reference labels)``, higher is better (e.g. mean foreground Dice).

    Returns:
        ``{method: mean score over the cases}`` for every :class:`~medseg.options.EnsembleMethod`.

    Raises:
        ConfigError: fewer than two folds.
    """
    weights, stackers = cross_fitted(cases_by_fold, fit_weights), cross_fitted(cases_by_fold, fit_stacker)
    totals = dict.fromkeys(EnsembleMethod, 0.0)
    count = 0
    for fold, cases in cases_by_fold.items():
        for probs, ref in cases:
            count += 1
            for method in EnsembleMethod:
                labels = combine(method, probs, weights=weights[fold], stacker=stackers[fold])
                totals[method] += float(score(labels, ref))
    return {method: total / max(count, 1) for method, total in totals.items()}


__all__ = [
    "MAX_VOXELS",
    "Case",
    "Stacker",
    "combine",
    "cross_fitted",
    "cross_validated_scores",
    "fit_stacker",
    "fit_weights",
    "majority_vote",
    "mean_probabilities",
    "weighted_probabilities",
]
