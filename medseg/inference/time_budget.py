"""Prediction within a time budget per case, and the sliding-window time estimate it shares with the final
validation of a time-budgeted training run (:mod:`medseg.training.validation_budget`).

**Estimate.** A case's network time is, summed over the networks that predict it (every ensemble member,
and the previous stage of a cascade): sliding-window positions on its preprocessed grid (per shift
variant of its TTA, :func:`~medseg.inference.sliding_window.tta_variants`; :func:`windows_per_pass`) x
flips x seconds per window x :data:`WINDOW_OVERHEAD`. Loading, resampling, export and the probabilities
cost :data:`CASE_SECONDS` + ``voxels x classes x`` :data:`VOXEL_CLASS_SECONDS` (:func:`case_seconds`).

**Prediction in a budget** (:class:`CaseBudget`, ``medseg predict --time-budget-per-case S``). Before each
case the settings of :func:`reduction_order` are tried in a fixed order until the estimate fits ``S``:

1. TTA passes per window from the full TTA down (:func:`pass_options`: 8 flips, or 2 flips x 2 shifts,
   then mirroring one axis fewer at a time: 8 -> 4 -> 2 -> 1), at the window overlap asked for (0.5);
2. then, without TTA, less window overlap: :data:`BUDGET_OVERLAPS` (0.5 -> 1/3 -> 1/4 -> 0; a step of
   0.5, 2/3, 3/4, 1 patch). An overlap that adds no window on this case's shape is skipped by the
   estimate itself.

When not even the last setting fits, it is used and the case is recorded as over its budget: a case is
never skipped nor cut short. The case's time is the sum of its stages: reading and preprocessing (known
when its setting is chosen), the network (estimated) and export (estimated, then corrected by the ratio
of measured to estimated export time so far). Seconds per window are measured once per network (one
warm-up and one timed batch of windows through the sliding window itself; its time counts to the first
case); later estimates are corrected by the ratio of measured to estimated network time of the cases
done. Reading and export run on worker threads beside the network, so the sum is an upper bound on the
case's share of the wall time. ``OUT/prediction_record.json`` records per case the passes and overlap
used, estimated and measured seconds and whether the budget held (:mod:`medseg.inference.prediction_record`).

**Default** (:func:`default_seconds_per_case`): on the CPU, a plan with a training time budget predicts
a :data:`REFERENCE_TEST_CASES`-case test set in at most :data:`PREDICTION_SHARE` of that budget (30
minutes: 9 s per case); a plan without a time budget, or a GPU, has no limit.

Shapes are ``(Z, Y, X)`` in voxels of the preprocessed case, patches ``(Z, Y, X)`` or ``(Y, X)``, times in
seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.inference.prediction_record import CaseRecord
from medseg.inference.sliding_window import shifted_shape, tta_variants

#: Time of a sliding-window patch relative to the measured eval forward (weighting, flips, copies). On the
#: 2-core Xeon, a 16-feature 96x64x64 network measured 0.82 s per patch up front and took 0.65 s per window
#: in the sliding window (72 windows, 2026-12-04): the measurement errs on the slow side already.
WINDOW_OVERHEAD = 1.0
#: Per case: loading, argmax, reading the reference and writing the segmentation (the hippocampus cases took
#: 0.1 s each).
CASE_SECONDS = 0.2
#: Per voxel and class: mapping the probabilities back, export and the compressed ``.npz`` (measured
#: 5.3 s for a 155x240x240 case with 5 classes on the 2-core Xeon).
VOXEL_CLASS_SECONDS = 1.2e-7
#: The sliding window's step (fraction of the patch) the final validation and ``medseg predict`` use.
STEP = 0.5
#: Window overlaps (1 - step) a prediction budget goes down through once TTA is off, most first.
BUDGET_OVERLAPS = (0.5, 1 / 3, 0.25, 0.0)
#: Share of a plan's training time budget that predicting :data:`REFERENCE_TEST_CASES` cases may take on the
#: CPU by default (a 30-minute model: 180 s for 20 cases).
PREDICTION_SHARE = 0.1
#: Test-set size the default per-case budget is computed for.
REFERENCE_TEST_CASES = 20


def num_tiles(size: int, patch: int, step: float = STEP) -> int:
    """Sliding-window positions along one axis (the volume is padded to the patch when smaller)."""
    if size <= patch:
        return 1
    return int(math.ceil((size - patch) / (patch * step))) + 1


def pass_options(mirror_axes: Sequence[int] | None, total_stride: Sequence[int], use_tta: bool = True) -> list[int]:
    """TTA passes per window a shortened prediction can run, most first: the full TTA, without shifts, then
    mirroring one axis fewer at a time, down to 1 (no TTA)."""
    if not use_tta:
        return [1]
    axes, shifts = tta_variants(mirror_axes, total_stride)
    full = 2 ** len(axes) * len(shifts)
    return sorted({full, *(2**k for k in range(len(axes) + 1))}, reverse=True)


def windows_per_pass(
    shape: Sequence[int], patch_size: Sequence[int], shifts: Sequence[Sequence[int]], step: float = STEP
) -> int:
    """Network inputs of one flip of one case: positions summed over the shift variants (2D: per slice)."""
    windows = 0
    for offset in shifts:
        grown = shifted_shape(shape, offset)[-len(patch_size) :]
        tiles = int(np.prod([num_tiles(s, p, step) for s, p in zip(grown, patch_size)]))
        windows += tiles * (int(shape[0]) if len(patch_size) == 2 else 1)
    return windows


def network_windows(
    shape: Sequence[int],
    patch_size: Sequence[int],
    passes: int,
    mirror_axes: Sequence[int] | None,
    total_stride: Sequence[int],
    step: float = STEP,
) -> int:
    """Network inputs (windows x flips, over the shift variants) of one case at ``passes`` TTA passes at most."""
    zero = [tuple(0 for _ in patch_size)]
    axes, shifts = tta_variants(mirror_axes, total_stride, passes=passes) if passes > 1 else ((), zero)
    return windows_per_pass(shape, patch_size, shifts, step) * 2 ** len(axes)


def export_seconds(voxels: int, num_classes: int) -> float:
    """Estimated seconds of loading, mapping back and writing a case of ``voxels`` voxels and ``num_classes``."""
    return CASE_SECONDS + float(voxels) * num_classes * VOXEL_CLASS_SECONDS


def case_seconds(
    shape: Sequence[int],
    patch_size: Sequence[int],
    num_classes: int,
    seconds_per_window: float,
    passes: int,
    mirror_axes: Sequence[int] | None,
    total_stride: Sequence[int],
    step: float = STEP,
) -> float:
    """Estimated seconds of predicting one case with one network at ``passes`` TTA passes (module docstring)."""
    windows = network_windows(shape, patch_size, passes, mirror_axes, total_stride, step)
    return windows * seconds_per_window * WINDOW_OVERHEAD + export_seconds(int(np.prod(shape)), num_classes)


@dataclass(frozen=True)
class NetworkJob:
    """One network's share of a case: what its sliding window covers.

    Attributes:
        key: the network's timing key (``configuration/arch``: folds of one network share it).
        shape: the preprocessed case shape ``(Z, Y, X)`` it predicts.
        patch_size: its patch.
        mirror_axes / total_stride: its TTA (:func:`~medseg.inference.sliding_window.tta_variants`).
        max_passes: the TTA passes it runs at most (its full TTA; 1 without TTA); a setting with more
            passes (another member's) gives it its own full TTA.
    """

    key: str
    shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    mirror_axes: tuple[int, ...] | None
    total_stride: tuple[int, ...]
    max_passes: int

    def windows(self, setting: CaseSetting) -> int:
        return network_windows(
            self.shape,
            self.patch_size,
            min(setting.passes, self.max_passes),
            self.mirror_axes,
            self.total_stride,
            setting.step,
        )


@dataclass(frozen=True)
class CaseSetting:
    """What the sliding window of a case uses: ``passes`` TTA passes per window at most (1 = no TTA; each
    network uses the most of its own TTA within it) and ``step`` (fraction of the patch; overlap = 1 - step)."""

    passes: int
    step: float

    @property
    def overlap(self) -> float:
        return round(1.0 - self.step, 3)

    def to_dict(self) -> dict[str, Any]:
        return {"tta_passes": self.passes, "overlap": self.overlap}


def reduction_order(passes: Sequence[int], step: float = STEP) -> list[CaseSetting]:
    """Settings a budget tries, in order: ``passes`` (most first) at ``step``, then 1 pass at each step of
    :data:`BUDGET_OVERLAPS` larger than ``step`` (less overlap)."""
    options = [CaseSetting(int(p), float(step)) for p in sorted(set(passes), reverse=True)]
    last = options[-1].passes if options else 1
    steps = [round(1.0 - o, 6) for o in BUDGET_OVERLAPS]
    options += [CaseSetting(last, s) for s in steps if s > step + 1e-9]
    return options


def network_seconds(jobs: Sequence[NetworkJob], seconds_per_window: Mapping[str, float], setting: CaseSetting) -> float:
    """Uncorrected network seconds of a case (see the module docstring)."""
    return sum(j.windows(setting) * seconds_per_window[j.key] for j in jobs) * WINDOW_OVERHEAD


def choose_setting(
    jobs: Sequence[NetworkJob],
    seconds_per_window: Mapping[str, float],
    options: Sequence[CaseSetting],
    limit: float,
    correction: float = 1.0,
) -> tuple[CaseSetting, float]:
    """The first of ``options`` whose network estimate (x ``correction``) fits ``limit`` seconds, else the last.

    Returns:
        ``(setting, estimated network seconds)``.
    """
    if not options:
        raise ValueError("no settings to choose from")
    for setting in options:
        seconds = correction * network_seconds(jobs, seconds_per_window, setting)
        if seconds <= limit:
            return setting, seconds
    return options[-1], correction * network_seconds(jobs, seconds_per_window, options[-1])


def default_seconds_per_case(training_minutes: float | None, device_type: str) -> float | None:
    """The default per-case budget of ``medseg predict``: on the CPU, :data:`PREDICTION_SHARE` of a plan's
    training budget over :data:`REFERENCE_TEST_CASES` cases (30 minutes: 9 s); None (no limit) without a
    training budget or on a GPU."""
    if training_minutes is None or device_type != "cpu":
        return None
    return float(training_minutes) * 60.0 * PREDICTION_SHARE / REFERENCE_TEST_CASES


class CaseBudget:
    """Chooses each case's :class:`CaseSetting` within ``seconds_per_case`` (None: the full setting always).

    Args:
        seconds_per_case: the budget of one case; None = no limit.
        options: :func:`reduction_order` of the predictor (the first is the full setting).
    """

    def __init__(self, seconds_per_case: float | None, options: Sequence[CaseSetting]) -> None:
        if not options:
            raise ValueError("no settings to choose from")
        self.seconds_per_case = seconds_per_case
        self.options = list(options)
        self.network_estimated = 0.0
        self.network_measured = 0.0
        self.write_estimated = 0.0
        self.write_measured = 0.0

    @property
    def full(self) -> CaseSetting:
        return self.options[0]

    @property
    def network_correction(self) -> float:
        """Measured / estimated network time of the cases done (1 before the first)."""
        return self.network_measured / self.network_estimated if self.network_estimated > 0 else 1.0

    def write_estimate(self, raw: float) -> float:
        """``raw`` (:func:`export_seconds`) corrected by measured / estimated export time of the cases done."""
        ratio = self.write_measured / self.write_estimated if self.write_estimated > 0 else 1.0
        return raw * ratio

    def choose(
        self, jobs: Sequence[NetworkJob], seconds_per_window: Mapping[str, float], spent: float, write_raw: float
    ) -> tuple[CaseSetting, CaseRecord, float]:
        """The setting for one case, the case's record (setting and estimate filled in) and the uncorrected
        network estimate of that setting (for :meth:`network_done`).

        Args:
            jobs: the case's networks.
            seconds_per_window: measured seconds per window by job key.
            spent: seconds the case has taken already (reading and preprocessing, the measurement).
            write_raw: :func:`export_seconds` of the case.

        Raises:
            ValueError: there is no per-case budget (``seconds_per_case`` is None: use :attr:`full`).
        """
        if self.seconds_per_case is None:
            raise ValueError("no per-case time budget to choose a setting for")
        write = self.write_estimate(write_raw)
        correction = self.network_correction
        setting, net = choose_setting(
            jobs, seconds_per_window, self.options, self.seconds_per_case - spent - write, correction
        )
        record = CaseRecord(
            setting.passes,
            setting.overlap,
            self.full.passes,
            self.full.overlap,
            budget_seconds=self.seconds_per_case,
            estimated_seconds=spent + net + write,
        )
        return setting, record, network_seconds(jobs, seconds_per_window, setting)

    def network_done(self, raw_estimate: float, seconds: float) -> None:
        """A case's network took ``seconds`` against an uncorrected estimate of ``raw_estimate``."""
        self.network_estimated += raw_estimate
        self.network_measured += seconds

    def write_done(self, raw_estimate: float, seconds: float) -> None:
        """A case's export took ``seconds`` against :func:`export_seconds` ``raw_estimate``."""
        self.write_estimated += raw_estimate
        self.write_measured += seconds


__all__ = [
    "BUDGET_OVERLAPS",
    "CASE_SECONDS",
    "PREDICTION_SHARE",
    "REFERENCE_TEST_CASES",
    "STEP",
    "VOXEL_CLASS_SECONDS",
    "WINDOW_OVERHEAD",
    "CaseBudget",
    "CaseSetting",
    "NetworkJob",
    "case_seconds",
    "choose_setting",
    "default_seconds_per_case",
    "export_seconds",
    "network_seconds",
    "network_windows",
    "num_tiles",
    "pass_options",
    "reduction_order",
    "windows_per_pass",
]
