"""Calibrated probabilities: one temperature fitted on cross-validation, and the expected calibration error.

The predictor averages softmax probabilities over ensemble members and test-time augmentation passes, so
the logits of the ensemble do not exist. The temperature ``T`` is therefore applied to the log of the
averaged probabilities: ``q_k = p_k ** (1/T) / sum_j p_j ** (1/T)`` (a softmax of ``log p / T``). For one
network without TTA this is exactly temperature scaling of its logits; for an ensemble it scales the
ensemble's log-probabilities. The map ``p -> q`` is monotone per voxel, so the argmax (the segmentation) never
changes; ``T > 1`` softens overconfident probabilities, ``T < 1`` sharpens them.

``T`` is fitted by minimising the negative log-likelihood of the reference class over the
*foreground-relevant* voxels (:func:`relevant_voxels`: within :data:`MARGIN` voxels of the union of predicted
and reference foreground) — the far background, confidently right in every model, would otherwise dominate
the fit and the error. :func:`expected_calibration_error` measures calibration on the same voxels with 15
equal-width bins of the top-class confidence.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage, optimize

__all__ = [
    "ECE_BINS",
    "MARGIN",
    "apply_temperature",
    "expected_calibration_error",
    "fit_temperature",
    "relevant_voxels",
    "tempered_power",
]

#: Bins of the expected calibration error (equal width on [0, 1]).
ECE_BINS = 15
#: Voxels within this many voxels (Chebyshev dilation) of predicted or reference foreground are relevant.
MARGIN = 3
#: Fitted temperatures are kept in this range.
T_RANGE = (0.05, 20.0)
_TINY = 1e-12


def tempered_power(p: np.ndarray, temperature: float) -> np.ndarray:
    """``p ** (1/T)`` of probabilities (float32, exact zeros stay zero), the unnormalised tempered probability.

    Args:
        p: probabilities in [0, 1], any shape.
        temperature: ``T > 0``.
    """
    return np.power(np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0), np.float32(1.0 / temperature))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(log p / T)`` along axis 0.

    Args:
        probs: averaged class probabilities ``(K, ...)`` (each voxel sums to 1).
        temperature: ``T > 0``; 1 returns the probabilities unchanged (as float32).

    Returns:
        float32 ``(K, ...)``, summing to 1 per voxel, with the same argmax as ``probs``.
    """
    if temperature == 1.0:
        return np.asarray(probs, dtype=np.float32)
    powered = tempered_power(probs, temperature)
    total = powered.sum(0, keepdims=True)
    return powered / np.maximum(total, np.float32(_TINY))


def relevant_voxels(pred: np.ndarray, ref: np.ndarray, margin: int = MARGIN) -> np.ndarray:
    """Voxels within ``margin`` voxels of the union of predicted and reference foreground.

    Args:
        pred, ref: class indices or label ids (0 = background), same shape.
        margin: dilation steps with a full (26/8-neighbour) structuring element.

    Returns:
        bool mask of ``pred``'s shape (all False when neither has foreground).
    """
    union = (pred != 0) | (ref != 0)
    if margin <= 0 or not union.any():
        return union
    structure = ndimage.generate_binary_structure(union.ndim, union.ndim)
    return ndimage.binary_dilation(union, structure, iterations=margin)


def _nll(log_p: np.ndarray, target: np.ndarray, temperature: float) -> float:
    z = log_p / temperature
    z = z - z.max(0, keepdims=True)
    log_norm = np.log(np.exp(z).sum(0))
    return float((log_norm - z[target, np.arange(target.size)]).mean())


def fit_temperature(probs: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    """The temperature minimising the negative log-likelihood of ``targets`` under ``softmax(log p / T)``.

    Args:
        probs: per sample set, class probabilities ``(K, N)`` (e.g. the relevant voxels of each case).
        targets: per sample set, the reference class index of each column, int ``(N,)``.

    Returns:
        ``T`` in :data:`T_RANGE` (1.0 when there are no samples).
    """
    if not probs or sum(t.size for t in targets) == 0:
        return 1.0
    p = np.concatenate([np.asarray(a, dtype=np.float64) for a in probs], axis=1)
    target = np.concatenate([np.asarray(t, dtype=np.int64) for t in targets])
    log_p = np.log(np.clip(p, _TINY, 1.0))
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    found = optimize.minimize_scalar(
        lambda log_t: _nll(log_p, target, float(np.exp(log_t))), bounds=(lo, hi), method="bounded"
    )
    return float(np.exp(found.x))


def expected_calibration_error(
    probs: Sequence[np.ndarray], targets: Sequence[np.ndarray], bins: int = ECE_BINS
) -> float:
    """Expected calibration error of the top-class confidence: ``sum_b n_b/N |accuracy_b - confidence_b|``.

    Args:
        probs: per sample set, class probabilities ``(K, N)``.
        targets: per sample set, the reference class index per column ``(N,)``.
        bins: equal-width confidence bins on [0, 1].

    Returns:
        The error in [0, 1] (0.0 when there are no samples).
    """
    conf = np.concatenate([np.asarray(p).max(0) for p in probs]) if probs else np.zeros(0)
    if conf.size == 0:
        return 0.0
    right = np.concatenate([np.asarray(p).argmax(0) == t for p, t in zip(probs, targets)])
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    right_sum = np.bincount(which, weights=right.astype(np.float64), minlength=bins)
    return float(np.abs(right_sum - conf_sum).sum() / conf.size)
