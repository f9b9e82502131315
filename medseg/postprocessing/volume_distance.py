"""The joint volume rule of the per-case quality verdict: how far a case's label volumes lie, together, from the
training cases'.

Each label's volume alone is judged by its z-score (:mod:`medseg.postprocessing.quality_features`, ``|z| > 3``).
Organs that are each a little too large or small slip under that rule although the combination is unlike any
training case (a CHAOS T2 prediction with liver +2.9 SD, left kidney +2.8, spleen +2.3: mean Dice 0.31). This
module measures the case jointly:

- **Which labels.** Those present in nearly every training case (the caller passes them: present in >= 95%), ``K``
  of them; the statistics come from the training cases that contain all ``K``.
- **Statistics.** ``x`` = the vector of ``log(volume in ml)``; its mean ``mu`` and sample covariance ``S`` over those
  cases, shrunk :data:`SHRINKAGE` toward its diagonal (``0.9 S + 0.1 diag(S)``: the correlations of a few dozen
  cases are noisy, the variances less so) plus :data:`RIDGE` on the diagonal (a label of constant volume).
- **Distance.** ``D^2 = (x - mu)^T S^-1 (x - mu)`` over the labels the prediction contains (a missing label is left
  out: the missing-label rule judges it), compared with the chi-square quantile :data:`QUANTILE` for that many
  degrees of freedom (what ``D^2`` of a Gaussian training-like case exceeds once in 1000).
- **When it is off.** Fewer than 2 such labels (then it is the per-label rule), or fewer than ``K +``
  :data:`MIN_EXTRA_CASES` training cases with all of them (a covariance of barely more cases than dimensions
  makes every case look far): :func:`fit_joint_volumes` returns None and no case gets the reason.

Volumes in ml, logs natural. Label ids are strings, as in ``quality.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["MIN_EXTRA_CASES", "QUANTILE", "RIDGE", "SHRINKAGE", "JointVolumes", "fit_joint_volumes", "volume_distance"]

#: The share of the covariance moved to its diagonal.
SHRINKAGE = 0.1
#: Added to the covariance's diagonal (log-volume units squared), so that it is always invertible.
RIDGE = 1e-6
#: ``D^2`` above this chi-square quantile makes the case ``review``.
QUANTILE = 0.999
#: The joint rule needs at least ``K +`` this many training cases containing all of its ``K`` labels.
MIN_EXTRA_CASES = 5


@dataclass(frozen=True)
class JointVolumes:
    """The training distribution of the log-volume vector of the labels nearly every case contains.

    Attributes:
        labels: the label ids (str), the order of ``mean`` and ``covariance``.
        mean: mean ``log(volume in ml)`` per label.
        covariance: the shrunk covariance ``(K, K)`` of the log-volumes (see the module docstring).
        num_cases: the training cases it was computed from (each containing every label).
    """

    labels: tuple[str, ...]
    mean: tuple[float, ...]
    covariance: tuple[tuple[float, ...], ...]
    num_cases: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``postprocessing.json``'s ``quality.joint_volumes``)."""
        return {
            "labels": list(self.labels),
            "mean": list(self.mean),
            "covariance": [list(row) for row in self.covariance],
            "num_cases": self.num_cases,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> JointVolumes | None:
        """The statistics of :meth:`to_dict`'s output; None for None or an empty mapping (no joint rule)."""
        if not data:
            return None
        return cls(
            tuple(str(label) for label in data["labels"]),
            tuple(float(v) for v in data["mean"]),
            tuple(tuple(float(v) for v in row) for row in data["covariance"]),
            int(data["num_cases"]),
        )


def fit_joint_volumes(cases: Sequence[Mapping[str, float]], labels: Sequence[str]) -> JointVolumes | None:
    """The joint log-volume statistics of ``labels`` over the training cases containing all of them.

    Args:
        cases: per training case, label id (str) -> volume in ml (absent or 0: the case lacks the label).
        labels: the labels to use (those nearly every training case contains).

    Returns:
        The statistics, or None when the rule is off: fewer than 2 labels, or fewer than
        ``len(labels) +`` :data:`MIN_EXTRA_CASES` cases with every label.
    """
    labels = [str(label) for label in labels]
    complete = [[case[label] for label in labels] for case in cases if all(case.get(lab, 0) > 0 for lab in labels)]
    if len(labels) < 2 or len(complete) < len(labels) + MIN_EXTRA_CASES:
        return None
    logs = np.log(np.asarray(complete, dtype=np.float64))  # (cases, K)
    covariance = np.cov(logs, rowvar=False)
    covariance = (1.0 - SHRINKAGE) * covariance + SHRINKAGE * np.diag(np.diag(covariance))
    covariance += RIDGE * np.eye(len(labels))
    return JointVolumes(
        tuple(labels),
        tuple(float(v) for v in logs.mean(axis=0)),
        tuple(tuple(float(v) for v in row) for row in covariance),
        len(complete),
    )


def volume_distance(labels: Mapping[str, Mapping[str, Any]], joint: JointVolumes) -> dict[str, Any] | None:
    """How far a case's label volumes lie, jointly, from the training cases'.

    Args:
        labels: label id (str) -> the case's features of the label (``voxels`` and ``volume_ml`` are read).
        joint: the training statistics.

    Returns:
        ``{"mahalanobis2": D^2, "threshold": chi-square quantile, "labels": [ids used]}``, or None when the case
        contains fewer than 2 of ``joint``'s labels.
    """
    used = [
        i
        for i, label in enumerate(joint.labels)
        if label in labels and labels[label].get("voxels") and labels[label].get("volume_ml", 0) > 0
    ]
    if len(used) < 2:
        return None
    x = np.asarray([math.log(labels[joint.labels[i]]["volume_ml"]) for i in used])
    diff = x - np.asarray(joint.mean)[used]
    covariance = np.asarray(joint.covariance)[np.ix_(used, used)]
    return {
        "mahalanobis2": float(diff @ np.linalg.solve(covariance, diff)),
        "threshold": float(stats.chi2.ppf(QUANTILE, len(used))),
        "labels": [joint.labels[i] for i in used],
    }
