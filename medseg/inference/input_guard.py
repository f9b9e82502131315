"""The input guard: one-line warnings when an image to predict lies outside what the model was trained on.

:class:`TrainingRange` condenses the training fingerprint (``WORK/fingerprint.json``, or
``training_range.json`` in a bundle) into what an input is compared with; :func:`check_input` compares one
image and returns its warnings. The guard never refuses an image: a model may still do well on it, and the
only impossible input (a wrong channel count) is refused where the channels are read.

Checks, each justified by its false-alarm rate on held-out training cases (docs/reliability.md, "Input guard"):

* **modality**: an image that looks like CT (at least :data:`CT_AIR_FRACTION` of its voxels at or below
  :data:`CT_AIR_HU`, as air is in Hounsfield units) given to a model whose channel is not CT, and a CT model
  given an image with no voxel that low and a non-negative 0.5th percentile (an MR image has no negative
  intensities); the training cases' own percentiles, where recorded, overrule the channel name (an offset-stored
  CT whose training images never go below 0 gets no modality line);
* **spacing**: on any axis more than :data:`SPACING_FACTOR` times the largest training spacing or less than
  1/:data:`SPACING_FACTOR` of the smallest;
* **size**: the physical extent (shape x spacing, mm) on any axis outside the same factor of the training range;
* **intensity**: a channel's whole-image 0.5/50/99.5th percentile outside the training cases' range of that
  percentile widened on each side by :data:`INTENSITY_MARGIN` times its width, at least :data:`INTENSITY_FLOOR`
  times the channel's whole training span;
* **orientation**: the image's nearest axis codes (e.g. ``LPS``) unlike every training case's.

Conventions: spacings and extents ``(Z, Y, X)`` in mm; direction cosines in SimpleITK order.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.errors import MedsegError
from medseg.fingerprint.image_statistics import image_percentiles
from medseg.io.codec import from_json_dict, to_json_dict
from medseg.io.image import ImageGeometry, atomic_write_text
from medseg.io.json_files import load_json_file, parse_json

if TYPE_CHECKING:
    from medseg.fingerprint import Fingerprint
    from medseg.planning.plan import Plan

logger = logging.getLogger(__name__)

__all__ = [
    "CT_AIR_FRACTION",
    "CT_AIR_HU",
    "INTENSITY_FLOOR",
    "INTENSITY_MARGIN",
    "SPACING_FACTOR",
    "TrainingRange",
    "axis_codes",
    "check_input",
    "guard_case",
    "channel_modality",
]

#: spacing and extent may be this many times beyond the training range before the guard warns
SPACING_FACTOR = 2.0
#: a percentile may lie this many training-range widths beyond that range before the guard warns
INTENSITY_MARGIN = 1.0
#: ... and at least this fraction of the channel's whole training intensity span (lowest 0.5th to highest 99.5th
#: percentile), so that a percentile all training cases share (the 0 background of cropped MR) is not a point
INTENSITY_FLOOR = 0.1
#: intensities at or below this are air in a CT (Hounsfield units; air is -1000)
CT_AIR_HU = -500.0
#: an image with at least this fraction of voxels at or below :data:`CT_AIR_HU` looks like a CT
CT_AIR_FRACTION = 0.05
_PERCENTILE_NAMES = ("0.5th", "50th", "99.5th")


def channel_modality(name: str) -> str:
    """``"CT"``, ``"MR"`` or ``"unknown"`` from a dataset.json channel name (``"CT"``, ``"T2"``, ``"MRI"``...)."""
    low = name.lower()
    if re.search(r"(^|[^a-z])ct([^a-z]|$)", low):
        return "CT"
    if re.search(r"mr|t1|t2|flair|adc|dwi|pd|diffusion", low):
        return "MR"
    return "unknown"


def axis_codes(direction: tuple[float, ...]) -> str:
    """The anatomical letters (LPS convention, ITK's) each image axis points to most, e.g. ``"LPS"``.

    Args:
        direction: direction cosines, SimpleITK order, row-major (9 values in 3D, 4 in 2D); column ``j``
            is the physical direction of image index axis ``j`` (x, y, z).
    """
    n = int(round(math.sqrt(len(direction))))
    if n * n != len(direction) or n == 0:
        return ""
    matrix = np.asarray(direction, dtype=np.float64).reshape(n, n)
    letters = ("LR", "PA", "SI")[:n]
    out = []
    for j in range(n):
        column = matrix[:, j]
        i = int(np.argmax(np.abs(column)))
        out.append(letters[i][0] if column[i] > 0 else letters[i][1])
    return "".join(out)


@dataclass(frozen=True)
class TrainingRange:
    """What the model was trained on, as far as the input guard checks it.

    Attributes:
        dataset_name: the training dataset.
        channel_names: one per input channel (dataset.json).
        num_cases: training cases the range was taken from (0 when only the plan's medians were known).
        spacing_min / spacing_max: per axis, the smallest and largest training spacing, mm ``(Z, Y, X)``.
        extent_min / extent_max: per axis, the smallest and largest physical size (shape x spacing), mm; empty
            when unknown.
        percentiles_min / percentiles_max: per channel, the smallest and largest whole-image 0.5/50/99.5th
            percentile over the training cases; empty when the fingerprint predates them.
        orientations: the training cases' axis codes (:func:`axis_codes`), sorted; empty when unknown.
    """

    dataset_name: str
    channel_names: tuple[str, ...]
    num_cases: int
    spacing_min: tuple[float, ...]
    spacing_max: tuple[float, ...]
    extent_min: tuple[float, ...] = ()
    extent_max: tuple[float, ...] = ()
    percentiles_min: tuple[tuple[float, float, float], ...] = ()
    percentiles_max: tuple[tuple[float, float, float], ...] = ()
    orientations: tuple[str, ...] = ()

    @property
    def modalities(self) -> tuple[str, ...]:
        """Per channel, ``"CT"``, ``"MR"`` or ``"unknown"`` (:func:`channel_modality`)."""
        return tuple(channel_modality(n) for n in self.channel_names)

    @classmethod
    def from_fingerprint(cls, fingerprint: Fingerprint) -> TrainingRange:
        """The range of the training cases of ``fingerprint`` (any subset of cases: ``dataclasses.replace``)."""
        cases = fingerprint.cases
        ndim = max(len(c.spacing) for c in cases)
        same = [c for c in cases if len(c.spacing) == ndim]
        spacings = np.array([c.spacing for c in same], dtype=np.float64)
        extents = spacings * np.array([c.shape for c in same], dtype=np.float64)
        with_pct = [c.image_percentiles for c in cases if len(c.image_percentiles) == len(fingerprint.channel_names)]
        pct_min: tuple[tuple[float, float, float], ...] = ()
        pct_max: tuple[tuple[float, float, float], ...] = ()
        if with_pct and len(with_pct) == len(cases):
            values = np.array(with_pct, dtype=np.float64)  # (cases, channels, 3)
            pct_min = tuple(tuple(float(v) for v in row) for row in values.min(axis=0))  # type: ignore[misc]
            pct_max = tuple(tuple(float(v) for v in row) for row in values.max(axis=0))  # type: ignore[misc]
        codes = {axis_codes(c.direction) for c in cases}
        return cls(
            dataset_name=fingerprint.dataset_name,
            channel_names=tuple(fingerprint.channel_names),
            num_cases=len(cases),
            spacing_min=tuple(float(v) for v in spacings.min(axis=0)),
            spacing_max=tuple(float(v) for v in spacings.max(axis=0)),
            extent_min=tuple(float(v) for v in extents.min(axis=0)),
            extent_max=tuple(float(v) for v in extents.max(axis=0)),
            percentiles_min=pct_min,
            percentiles_max=pct_max,
            orientations=tuple(sorted(codes)) if "" not in codes else (),
        )

    @classmethod
    def from_plan(cls, plan: Plan) -> TrainingRange:
        """The little a plan alone tells: the channels and the median training spacing (a model without a
        recorded range, e.g. an older bundle; then only spacing and modality are checked)."""
        median = tuple(float(s) for s in plan.original_median_spacing)
        return cls(plan.dataset_name, tuple(plan.channel_names), 0, median, median)

    # ------------------------------------------------------------ JSON
    def to_json(self) -> str:
        return _json_text(self)

    @classmethod
    def from_dict(cls, data: object, where: str = "training range") -> TrainingRange:
        """Inverse of :meth:`to_json`'s object.

        Raises:
            MedsegError: unknown or missing keys, values of the wrong type.
        """
        return from_json_dict(cls, data, where, MedsegError)

    @classmethod
    def from_json(cls, text: str, where: str = "training range") -> TrainingRange:
        return cls.from_dict(parse_json(text, where), where)

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> TrainingRange:
        return load_json_file(path, cls.from_dict, "training range", missing="training range file not found")


def _json_text(training_range: TrainingRange) -> str:
    """``training_range`` as indented JSON (a NaN percentile, which JSON lacks, written as null)."""

    def clean(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    data = {k: clean(v) for k, v in to_json_dict(training_range).items()}
    return json.dumps(data, indent=1) + "\n"


def _fmt(values: tuple[float, ...] | list[float]) -> str:
    return "[" + ", ".join(f"{float(v):.3g}" for v in values) + "]"


def _beyond(values: tuple[float, ...], low: tuple[float, ...], high: tuple[float, ...], factor: float) -> bool:
    """Whether any axis of ``values`` is > ``factor`` x ``high`` or < ``low`` / ``factor`` (trailing axes matched)."""
    k = min(len(values), len(low), len(high))
    if k == 0:
        return False
    v, lo, hi = values[-k:], low[-k:], high[-k:]
    return any(x > factor * h or x < lo_ / factor for x, lo_, h in zip(v, lo, hi) if lo_ > 0 and h > 0)


def _modality_warning(case_id: str, image: np.ndarray, tr: TrainingRange) -> str | None:
    """The modality line: a CT-looking channel for a non-CT model channel, or the reverse.

    Where the training cases' percentiles are known they overrule the channel name: a non-CT channel whose
    training images reach down to CT air, or a CT channel whose training images never go below 0 (CT stored
    with an offset), gets no modality line.
    """
    for c, modality in enumerate(tr.modalities[: image.shape[0]]):
        known = len(tr.percentiles_min) == image.shape[0]
        if known and modality != "CT" and tr.percentiles_min[c][0] <= CT_AIR_HU:
            continue
        if known and modality == "CT" and tr.percentiles_max[c][0] >= 0.0:
            continue
        values = np.asarray(image[c]).reshape(-1)
        values = values[:: max(1, values.size // 1_000_000)]
        air = float(np.mean(values <= CT_AIR_HU)) if values.size else 0.0
        if modality != "CT" and air >= CT_AIR_FRACTION:
            return (
                f"{case_id}: channel {c} looks like a CT ({air:.0%} of voxels at or below {CT_AIR_HU:g}, air in HU) "
                f"but the model was trained on {modality if modality != 'unknown' else 'non-CT'} images"
            )
        if modality == "CT" and air == 0.0 and values.size and float(np.percentile(values, 0.5)) >= 0.0:
            return (
                f"{case_id}: channel {c} has no voxel below 0 and none near -1000 (air in HU): it does not look "
                "like a CT, but the model was trained on CT images"
            )
    return None


def check_input(image: np.ndarray, geometry: ImageGeometry, training_range: TrainingRange, case_id: str) -> list[str]:
    """One-line warnings for an input image outside the model's training range (empty when it is inside).

    Args:
        image: the input channels ``(C, Z, Y, X)`` (or ``(C, Y, X)``) in the image's own units.
        geometry: the image's geometry (spacing in mm, ``(Z, Y, X)``).
        training_range: what the model was trained on.
        case_id: the case's name, which starts every line.

    Returns:
        one line per check that fired (modality, spacing, size, intensity, orientation), in that order.
    """
    tr = training_range
    out: list[str] = []
    modality = _modality_warning(case_id, image, tr)
    if modality:
        out.append(modality)
    spacing = tuple(float(s) for s in geometry.spacing)
    if _beyond(spacing, tr.spacing_min, tr.spacing_max, SPACING_FACTOR):
        where = (
            f"range {_fmt(tr.spacing_min)}..{_fmt(tr.spacing_max)}"
            if tr.num_cases
            else f"median {_fmt(tr.spacing_max)}"
        )
        out.append(
            f"{case_id}: spacing {_fmt(spacing)} mm is far from the training data's {where} mm "
            f"(beyond {SPACING_FACTOR:g}x on an axis); the segmentation may be poor"
        )
    extent = tuple(s * n for s, n in zip(spacing, geometry.shape))
    if _beyond(extent, tr.extent_min, tr.extent_max, SPACING_FACTOR):
        out.append(
            f"{case_id}: image size {_fmt(extent)} mm is far from the training images' "
            f"{_fmt(tr.extent_min)}..{_fmt(tr.extent_max)} mm (beyond {SPACING_FACTOR:g}x on an axis)"
        )
    if tr.percentiles_min and len(tr.percentiles_min) == image.shape[0]:
        for c, (case_p, lo, hi) in enumerate(zip(image_percentiles(image), tr.percentiles_min, tr.percentiles_max)):
            floor = INTENSITY_FLOOR * (hi[2] - lo[0])  # a percentile every training case shares (e.g. 0) still has room
            outside = [
                name
                for name, v, a, b in zip(_PERCENTILE_NAMES, case_p, lo, hi)
                if math.isfinite(v)
                and not (a - max(INTENSITY_MARGIN * (b - a), floor) <= v <= b + max(INTENSITY_MARGIN * (b - a), floor))
            ]
            if outside:
                out.append(
                    f"{case_id}: channel {c} intensities (0.5/50/99.5th percentile {_fmt(case_p)}) are outside the "
                    f"training images' ({_fmt(lo)}..{_fmt(hi)}) at the {'/'.join(outside)} percentile "
                    "(another scanner or protocol?)"
                )
    code = axis_codes(tuple(geometry.direction))
    if tr.orientations and code and code not in tr.orientations:
        out.append(
            f"{case_id}: orientation {code} differs from every training image's ({', '.join(tr.orientations)}); "
            "the model may not have learned this view"
        )
    return out


def guard_case(
    case_id: str, image: np.ndarray, geometry: ImageGeometry, training_range: TrainingRange, sink: list[str]
) -> tuple[str, ...]:
    """:func:`check_input` for a case being predicted: each line logged as a warning and appended to ``sink``.

    Returns:
        the case's warnings (what :class:`~medseg.inference.case_output.FinishedCase` carries).
    """
    warnings = check_input(image, geometry, training_range, case_id)
    for warning in warnings:
        logger.warning(warning)
    sink.extend(warnings)
    return tuple(warnings)
