"""Per-case quality estimate of a segmentation: features from its (calibrated) probabilities, a score, a verdict.

Per foreground label ``l`` of a case, with ``M`` the predicted mask, ``q`` the calibrated probability of ``l``
and ``H`` the normalised predictive entropy (:func:`entropy_terms`, 0 where every member and pass agrees with
certainty, 1 where all classes are equally likely):

- ``expected_dice``: ``2 sum_M q / (sum_N q + |M|)`` with ``N`` the voxels within :data:`NEAR_MARGIN` of ``M``:
  the Dice the prediction would have if the reference were drawn from ``q`` near the structure (the soft
  Dice of the prediction against its own probabilities; the temperature is fitted on such voxels, the far
  background's low probabilities are not); for an empty ``M``, 1 when ``q`` stays below
  :data:`ABSENT_BELOW` everywhere, else 0;
- ``uncertainty_inside`` / ``uncertainty_border``: mean ``H`` inside ``M`` / in the one-voxel band around
  its surface (dilated minus eroded mask);
- ``components``: connected components of ``M`` (full connectivity);
- ``volume_ml`` and ``volume_z``: the volume and its z-score of ``log(volume)`` among the training cases
  that contain the label (None without training statistics).

The case's score is the predicted mean foreground Dice: a monotone map of the mean ``expected_dice``
(:class:`QualityModel`; identity without find-best, a linear fit of real vs expected Dice on the
cross-validation cases with it). The verdict is ``review`` when the score is below the model's threshold, a
label's volume is far outside the training range (``|z| > VOLUME_Z``), the labels' volumes are jointly unlike the
training cases' (:mod:`medseg.postprocessing.volume_distance`), a label present in nearly every
training case is missing, a label breaks into more components than the training references ever had, or
the input guard warned about the input; else ``ok``. Each reason is a sentence in ``reasons``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.postprocessing.volume_distance import QUANTILE, JointVolumes, volume_distance

__all__ = [
    "DEFAULT_REVIEW_BELOW",
    "LabelVolumes",
    "QualityModel",
    "VOLUME_Z",
    "case_verdict",
    "entropy_terms",
    "label_features",
]

#: Without a fitted model: review a case whose predicted mean foreground Dice is below this.
DEFAULT_REVIEW_BELOW = 0.75
#: Review a label whose log-volume lies more than this many standard deviations from the training mean.
VOLUME_Z = 3.0
#: A label present in at least this fraction of the training cases is expected in every case.
EXPECTED_PRESENT = 0.95
#: ``expected_dice`` counts the probability mass within this many voxels of the predicted structure.
NEAR_MARGIN = 3
#: A label predicted nowhere is taken as rightly absent when its probability stays below this everywhere.
ABSENT_BELOW = 0.1


@dataclass(frozen=True)
class LabelVolumes:
    """The training distribution of one label's volume.

    Attributes:
        log_mean, log_std: mean and standard deviation of ``log(volume in ml)`` over the cases containing it.
        present_fraction: fraction of the training cases that contain the label.
        max_components: most connected components the label has in one training reference (face
            connectivity, as the fingerprint counts them; 0 when unknown).
    """

    log_mean: float
    log_std: float
    present_fraction: float
    max_components: int = 0


@dataclass(frozen=True)
class QualityModel:
    """The map from features to the predicted mean foreground Dice, and the review threshold.

    Attributes:
        intercept, slope: ``score = clip(intercept + slope * mean expected Dice, 0, 1)``.
        review_below: scores below this get the verdict ``review``.
        source: ``heuristic`` (no cross-validation) or ``cross-validation``.
        volumes: label id (str) -> its training volume distribution.
        fit: what the fit saw (cases, correlation), for the record.
        joint_volumes: the joint log-volume statistics of the labels nearly every training case contains, or
            None (no joint volume rule: too few such labels or cases, or a model stored before it existed).
    """

    intercept: float = 0.0
    slope: float = 1.0
    review_below: float = DEFAULT_REVIEW_BELOW
    source: str = "heuristic"
    volumes: Mapping[str, LabelVolumes] = field(default_factory=dict)
    fit: Mapping[str, Any] = field(default_factory=dict)
    joint_volumes: JointVolumes | None = None

    def score(self, expected_dice: float) -> float:
        """The predicted mean foreground Dice of a case whose mean expected Dice is ``expected_dice``."""
        return float(min(1.0, max(0.0, self.intercept + self.slope * expected_dice)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in ``postprocessing.json`` under ``quality``."""
        return {
            "intercept": self.intercept,
            "slope": self.slope,
            "review_below": self.review_below,
            "source": self.source,
            "volumes": {k: vars(v) for k, v in self.volumes.items()},
            "fit": dict(self.fit),
            "joint_volumes": None if self.joint_volumes is None else self.joint_volumes.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> QualityModel:
        """The model of :meth:`to_dict`'s output (the heuristic default for None or an empty mapping)."""
        if not data:
            return cls()
        volumes = {str(k): LabelVolumes(**v) for k, v in (data.get("volumes") or {}).items()}
        return cls(
            float(data.get("intercept", 0.0)),
            float(data.get("slope", 1.0)),
            float(data.get("review_below", DEFAULT_REVIEW_BELOW)),
            str(data.get("source", "heuristic")),
            volumes,
            dict(data.get("fit") or {}),
            JointVolumes.from_dict(data.get("joint_volumes")),
        )


def entropy_terms(p: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """One class's contribution to the tempered normaliser and entropy sums.

    With ``a = 1/T``, ``S0 = sum_k p_k^a`` and ``S1 = sum_k p_k^a log p_k`` over the classes, the entropy of the
    calibrated probabilities ``q_k = p_k^a / S0`` is ``log S0 - a S1 / S0`` (nats): accumulated class by class,
    never holding every class at once.

    Args:
        p: the mean probability of one class, float ``(Z, Y, X)`` in [0, 1].
        temperature: ``T > 0``.

    Returns:
        ``(p^a, p^a log p)`` as float32 (0 where ``p`` is 0).
    """
    p = np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0)
    powered = p if temperature == 1.0 else np.power(p, np.float32(1.0 / temperature))
    weighted = np.maximum(p, np.float32(1e-30))  # where p is 0, powered is 0 too: the product is 0
    np.log(weighted, out=weighted)
    weighted *= powered
    return powered, weighted


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` dilated ``radius`` times with the full-connectivity structure (a cube of side ``2 radius + 1``),
    as a separable maximum filter: equal to ``ndimage.binary_dilation(mask, full structure, iterations=radius)``
    (outside the array counts as background in both), several times faster for many labels."""
    return np.asarray(ndimage.maximum_filter(mask, size=2 * radius + 1, mode="constant", cval=0), dtype=bool)


def label_features(
    mask: np.ndarray,
    q: np.ndarray | None,
    entropy: np.ndarray | None,
    voxel_ml: float,
    volumes: LabelVolumes | None,
) -> dict[str, Any]:
    """The features of one label of one case (see the module docstring).

    Args:
        mask: the predicted mask of the label, bool ``(Z, Y, X)``.
        q: its calibrated probability ``(Z, Y, X)``, or None (no probabilities: region plans).
        entropy: the normalised entropy map ``(Z, Y, X)`` in [0, 1], or None.
        voxel_ml: the volume of one voxel in ml.
        volumes: the label's training volume distribution, or None.

    Returns:
        ``voxels``, ``volume_ml``, ``components``, ``expected_dice``, ``uncertainty_inside``,
        ``uncertainty_border``, ``volume_z`` (None where not computable).
    """
    voxels = int(mask.sum())
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components = int(ndimage.label(mask, structure)[1]) if voxels else 0
    expected = inside = border = None
    if q is not None:
        if voxels:  # the probability mass near the structure (the far background's specks are not its errors)
            near = _dilate(mask, NEAR_MARGIN)
            expected = 2.0 * float(q[mask].sum(dtype=np.float64)) / (float(q[near].sum(dtype=np.float64)) + voxels)
        else:  # nothing predicted: right unless the label is likely somewhere
            expected = 0.0 if bool((q >= ABSENT_BELOW).any()) else 1.0
    if entropy is not None and voxels:
        inside = float(entropy[mask].mean(dtype=np.float64))
        band = _dilate(mask, 1) & ~ndimage.binary_erosion(mask, structure)
        border = float(entropy[band].mean(dtype=np.float64))
    volume_ml = voxels * voxel_ml
    z = None
    if volumes is not None and voxels and volumes.log_std > 0:
        z = (math.log(volume_ml) - volumes.log_mean) / volumes.log_std
    return {
        "voxels": voxels,
        "volume_ml": volume_ml,
        "components": components,
        "expected_dice": expected,
        "uncertainty_inside": inside,
        "uncertainty_border": border,
        "volume_z": z,
    }


def case_verdict(
    labels: Mapping[str, Mapping[str, Any]], model: QualityModel, warnings: Sequence[str] = ()
) -> dict[str, Any]:
    """The score, verdict and reasons of a case from its per-label features.

    Args:
        labels: foreground label id (str) -> :func:`label_features` (plus e.g. ``name``).
        model: the score map, threshold and training volumes.
        warnings: the input guard's lines for the case (each makes the verdict ``review``).

    Returns:
        ``{"score", "expected_dice", "verdict", "reasons", "volume_distance"}``; ``score`` is None when no label
        has probabilities (then the verdict rests on the other reasons); ``volume_distance`` is
        :func:`~medseg.postprocessing.volume_distance.volume_distance`'s record, None without the joint rule.
    """
    reasons: list[str] = []
    expected = [f["expected_dice"] for f in labels.values() if f.get("expected_dice") is not None]
    mean_expected = float(np.mean(expected)) if expected else None
    score = None if mean_expected is None else model.score(mean_expected)
    if score is not None and score < model.review_below:
        reasons.append(f"predicted mean foreground Dice {score:.2f} is below {model.review_below:.2f}")
    for label, f in labels.items():
        volumes = model.volumes.get(label)
        name = f"label {label}" + (f" ({f['name']})" if f.get("name") else "")
        if volumes is None:
            continue
        if not f["voxels"] and volumes.present_fraction >= EXPECTED_PRESENT:
            reasons.append(f"{name} is missing (present in {volumes.present_fraction:.0%} of the training cases)")
        z = f.get("volume_z")
        if z is not None and abs(z) > VOLUME_Z:
            reasons.append(f"{name}: volume {f['volume_ml']:.3g} ml is {z:+.1f} SD from the training volumes")
        if volumes.max_components and f["components"] > max(2, 2 * volumes.max_components):
            reasons.append(
                f"{name} has {f['components']} components (training references: at most {volumes.max_components})"
            )
    distance = None if model.joint_volumes is None else volume_distance(labels, model.joint_volumes)
    if distance is not None and distance["mahalanobis2"] > distance["threshold"]:
        named = [
            label + (f" ({labels[label]['name']})" if labels[label].get("name") else "") for label in distance["labels"]
        ]
        reasons.append(
            f"label volumes jointly unlike the training cases (squared Mahalanobis distance "
            f"{distance['mahalanobis2']:.1f} > {distance['threshold']:.1f}, the chi-square {QUANTILE} quantile "
            f"for labels {', '.join(named)})"
        )
    reasons.extend(f"input: {w}" for w in warnings)
    return {
        "score": score,
        "expected_dice": mean_expected,
        "verdict": "review" if reasons else "ok",
        "reasons": reasons,
        "volume_distance": distance,
    }
