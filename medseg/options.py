"""The named choices of medseg's options, as :class:`~enum.StrEnum` s (Base layer: standard library only).

A member compares equal to its string (``Precision.BF16 == "bf16"``) and serialises to it with
:mod:`json`, so ``plans.json`` and ``config.json`` files and callers passing plain strings keep working.
:func:`parse_option` turns a string into a member with one error that lists the valid values; the CLI takes
its ``choices`` from :func:`choices`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from medseg.errors import ConfigError, MedsegError

E = TypeVar("E", bound=StrEnum)


class Precision(StrEnum):
    """Arithmetic of a network's forward and backward passes (``auto``: decided per device at run time)."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


#: The concrete precisions (every :class:`Precision` but ``auto``): what a plan or a resolved run holds.
PRECISIONS: tuple[Precision, ...] = (Precision.FP32, Precision.BF16, Precision.FP16)


class DeviceKind(StrEnum):
    """Kind of compute device; a run's device string may add an index (``cuda:1``)."""

    CPU = "cpu"
    CUDA = "cuda"


class Optimizer(StrEnum):
    """Optimizer of a training run (``auto``: SGD for epoch-based runs, AdamW for time-budgeted ones;
    ``lookahead-*``: that optimizer inside Lookahead, :mod:`medseg.training.lookahead`)."""

    AUTO = "auto"
    SGD = "sgd"
    ADAMW = "adamw"
    LOOKAHEAD_SGD = "lookahead-sgd"
    LOOKAHEAD_ADAMW = "lookahead-adamw"


class LRSchedule(StrEnum):
    """Learning-rate schedule over a run's progress."""

    POLY = "poly"
    COSINE_RESTARTS = "cosine_restarts"


class WeightAveraging(StrEnum):
    """Which weights become ``checkpoint_final`` (``auto``: ``ema`` for time-budgeted runs, else ``off``)."""

    AUTO = "auto"
    OFF = "off"
    EMA = "ema"


class Switch(StrEnum):
    """A three-way command-line switch (``auto``: the run's default)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class NormLayer(StrEnum):
    """Normalisation layer of a network's convolution blocks."""

    INSTANCE = "instance"
    BATCH = "batch"
    GROUP = "group"


class NormalizationScheme(StrEnum):
    """Intensity normalisation of one input channel (see :mod:`medseg.preprocessing.normalization`)."""

    CT = "ct"
    ZSCORE = "zscore"
    NONE = "none"


class CheckpointName(StrEnum):
    """Checkpoint of a run that prediction and export load (``snapshots``: every
    ``checkpoint_snapshot_<i>.pt`` of a run trained with ``--snapshots``, each a member; prediction only)."""

    FINAL = "final"
    BEST = "best"
    LATEST = "latest"
    SNAPSHOTS = "snapshots"


class ExportFormat(StrEnum):
    """Output format of ``medseg export``."""

    BUNDLE = "bundle"
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"


class OutputFormat(StrEnum):
    """What ``medseg predict`` writes per case besides its NIfTI label map (``dicom-seg``, ``rtstruct``: a DICOM
    object of the input series, see :mod:`medseg.inference.dicom_output`)."""

    NIFTI = "nifti"
    DICOM_SEG = "dicom-seg"
    RTSTRUCT = "rtstruct"


class LesionMatching(StrEnum):
    """How predicted lesions are matched to reference lesions (see :mod:`medseg.evaluation.lesion_wise`)."""

    IOU = "iou"
    BRATS = "brats"


class SelectionMetric(StrEnum):
    """The metric ``medseg find-best`` ranks candidates and fits postprocessing by."""

    DICE = "dice"
    LESION_F1 = "lesion_f1"
    LESION_DICE = "lesion_dice"
    PQ = "pq"


class SegmentOverlaps(StrEnum):
    """What ``medseg convert`` does with annotation segments that overlap: refuse them, or region-based labels."""

    ERROR = "error"
    REGIONS = "regions"


class EnsembleMethod(StrEnum):
    """How an ensemble's members' probabilities become one segmentation (:mod:`medseg.ensembling.combine`)."""

    MEAN = "mean"
    WEIGHTED = "weighted"
    VOTE = "vote"
    STACKING = "stacking"


def choices(enum: type[StrEnum]) -> list[str]:
    """The values of ``enum`` as plain strings, in declaration order (for ``argparse`` ``choices``)."""
    return [m.value for m in enum]


def valid_values(enum: type[StrEnum]) -> str:
    """``'a', 'b' or 'c'``: the values of ``enum`` for an error message."""
    quoted = [repr(v) for v in choices(enum)]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def parse_option(enum: type[E], value: object, what: str, error: type[MedsegError] = ConfigError) -> E:
    """``value`` as a member of ``enum``.

    Args:
        enum: the option's enum.
        value: a member or its string.
        what: the option's name in the error message (``"precision"``).
        error: the error type to raise (:class:`ConfigError` for settings, :class:`PlanError` for plans).

    Returns:
        The member whose value is ``value``.

    Raises:
        error: ``value`` is none of the enum's values; the message lists them.
    """
    try:
        return enum(value)  # type: ignore[arg-type]  # anything: a non-string is refused below
    except ValueError:
        raise error(f"{what} must be one of {choices(enum)}, got {value!r}") from None


__all__ = [
    "PRECISIONS",
    "CheckpointName",
    "DeviceKind",
    "EnsembleMethod",
    "ExportFormat",
    "LRSchedule",
    "LesionMatching",
    "NormLayer",
    "NormalizationScheme",
    "Optimizer",
    "OutputFormat",
    "Precision",
    "SegmentOverlaps",
    "SelectionMetric",
    "Switch",
    "WeightAveraging",
    "choices",
    "parse_option",
    "valid_values",
]
