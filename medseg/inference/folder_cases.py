"""The input and output folders of ``medseg predict``: checks, and finding and reading the cases to predict.

:func:`find_input_cases` finds the cases of an input folder: image files (one per channel,
``<case>_<channel:04d>.<suffix>``, :func:`find_cases_tolerant`, which reports the malformed ones instead of
refusing the folder) or, when the folder holds no such files but DICOM, one :class:`DicomCase` per DICOM image
series found under it (:mod:`medseg.io.dicom_series`; bad series reported, non-image objects skipped);
:func:`read_case` reads a case of either kind;
:func:`check_folders` / :func:`check_writable` refuse unusable folders before any case is predicted (the
input guard, :mod:`medseg.inference.input_guard`, flags images unlike the training data's).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DatasetError, MedsegError
from medseg.io.dataset import Case, find_prediction_cases
from medseg.io.dicom_series import DicomSeries, read_series_image, scan_dicom_folder
from medseg.io.image import IMAGE_SUFFIXES, ImageGeometry, has_image_suffix, read_channels, strip_suffix
from medseg.io.validation import nifti_raw_check

logger = logging.getLogger(__name__)

__all__ = [
    "DicomCase",
    "case_error_message",
    "case_suffix",
    "check_folders",
    "check_writable",
    "find_cases_tolerant",
    "find_input_cases",
    "holds_image_files",
    "nonfinite_message",
    "read_case",
]


@dataclass(frozen=True)
class DicomCase(Case):
    """A case that is one DICOM image series (``image_files``: its first file; ``label_file`` None).

    Attributes:
        series: the series (its files in volume order, UIDs); what a DICOM output writer references.
    """

    series: DicomSeries


def case_suffix(path: Path) -> str:
    """The image suffix of ``path`` (``.nii.gz`` when none is known)."""
    return next((s for s in IMAGE_SUFFIXES if path.name.endswith(s)), ".nii.gz")


def check_folders(input_dir: Path, output_dir: Path) -> None:
    """Refuse a missing input folder, and an output folder that is the input folder, inside it, or a file.

    Raises:
        MedsegError: naming the problem.
    """
    if not input_dir.is_dir():
        raise MedsegError(f"{input_dir}: input folder not found")
    inp, out = input_dir.resolve(), output_dir.resolve()
    if out == inp or inp in out.parents:
        raise MedsegError(
            f"{output_dir}: the output folder must not be the input folder or inside it ({input_dir}); "
            "medseg never writes next to your input images"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise MedsegError(f"{output_dir}: the output folder is a file; choose another output folder")


def check_writable(output_dir: Path) -> None:
    """Create ``output_dir`` and prove a file can be written in it (before any case is predicted).

    Raises:
        MedsegError: the folder cannot be created or written.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix=".tmp_", dir=output_dir) as fh:
            fh.write(b"medseg")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise MedsegError(f"{output_dir}: cannot write into the output folder ({exc.strerror or exc})") from None


_PROBLEM_RE = re.compile(r"^case (?P<case>.+?): ")


def find_cases_tolerant(input_dir: Path, num_channels: int) -> tuple[list[Any], dict[str, str]]:
    """Cases to predict plus the cases that cannot be formed (wrong channel files), without giving up.

    :func:`medseg.io.dataset.find_prediction_cases` refuses the whole folder when one case is malformed;
    here the malformed cases are reported (case id -> message) and every other case is still returned,
    found by the same function on a temporary folder of links to the remaining files.

    Raises:
        MedsegError: the folder is missing or has no images at all.
    """
    try:
        return find_prediction_cases(input_dir, num_channels), {}
    except DatasetError as exc:
        failed: dict[str, str] = {}
        for problem in exc.problems:
            m = _PROBLEM_RE.match(problem)
            if m is None:
                raise
            failed.setdefault(m.group("case"), problem[m.end() :])
    channel_re = re.compile(r"^(?P<case>.+)_\d{4}$")
    with tempfile.TemporaryDirectory(prefix="medseg_cases_") as tmp:
        for f in sorted(input_dir.iterdir()):
            if not f.is_file() or f.name.startswith(".") or not has_image_suffix(f.name):
                continue
            stem = strip_suffix(f.name)
            m = channel_re.match(stem)
            if stem in failed or (m is not None and m.group("case") in failed):
                continue
            os.symlink(f.resolve(), Path(tmp) / f.name)
        try:
            linked = find_prediction_cases(Path(tmp), num_channels) if any(Path(tmp).iterdir()) else []
        except DatasetError:
            linked = []
    cases = [dataclasses.replace(c, image_files=tuple(input_dir / p.name for p in c.image_files)) for c in linked]
    return cases, failed


def _top_files(input_dir: Path) -> list[Path]:
    """The visible files at the top of ``input_dir``, sorted."""
    return [f for f in sorted(input_dir.iterdir()) if f.is_file() and not f.name.startswith(".")]


def holds_image_files(input_dir: Path) -> bool:
    """Whether ``input_dir`` is read as image files (one at its top has an image suffix); else it is searched
    for DICOM series (:func:`find_input_cases`)."""
    return any(has_image_suffix(f.name) for f in _top_files(input_dir))


def find_input_cases(input_dir: Path, num_channels: int) -> tuple[list[Any], dict[str, str], list[str]]:
    """The cases of a ``medseg predict`` input folder, the ones that cannot be predicted, and warnings.

    A folder with image files (:data:`~medseg.io.image.IMAGE_SUFFIXES`) at its top is read as such
    (:func:`find_cases_tolerant`; other top-level files are named in a warning). A folder without them is searched
    for DICOM (recursively): each image series is a :class:`DicomCase` named by its
    :attr:`~medseg.io.dicom_series.DicomSeries.case_id`; a bad series or corrupt file fails with one message;
    non-image objects (SEG, RTSTRUCT, SR, ...) are skipped with one log line each; non-DICOM files are named in a
    warning.

    Returns:
        ``(cases, failed, warnings)``: cases sorted by case id, case (or file) -> message, warning lines.

    Raises:
        MedsegError: no images and no DICOM in the folder; DICOM input for a model of several channels.
    """
    top = _top_files(input_dir)
    if not holds_image_files(input_dir):
        scan = scan_dicom_folder(input_dir)
        if scan.found_dicom:
            if num_channels != 1:
                raise MedsegError(
                    f"{input_dir}: DICOM input gives one channel per series, the model expects {num_channels}; "
                    "convert the series to channel files (CASE_0000.nii.gz, CASE_0001.nii.gz, ...)"
                )
            for obj in scan.objects:
                logger.info(
                    "%s: skipped, a %s object (%s) is not an image to segment", obj.path, obj.kind, obj.modality
                )
            warnings = []
            if scan.not_dicom:
                names = ", ".join(str(p.relative_to(input_dir)) for p in scan.not_dicom)
                warnings.append(f"{input_dir}: ignoring {len(scan.not_dicom)} file(s) that are not DICOM: {names}")
            cases = [DicomCase(s.case_id, (s.files[0],), None, s) for s in scan.series]
            return cases, dict(scan.failed), warnings
    cases, failed = find_cases_tolerant(input_dir, num_channels)
    ignored = [f.name for f in top if not has_image_suffix(f.name)]
    warnings = [f"{input_dir}: ignoring {len(ignored)} file(s) that are not images: " + ", ".join(ignored)]
    return cases, failed, warnings if ignored else []


def read_case(case: Any, num_channels: int) -> tuple[np.ndarray, ImageGeometry]:
    """Read a case's channels as float32 ``(C, Z, Y, X)`` (or ``(C, Y, X)``) and the first channel's geometry.

    Raises:
        MedsegError: the wrong number of channel files; a truncated NIfTI or one with NaN/Inf voxels; an
            unreadable file or DICOM series (the message names it).
    """
    if isinstance(case, DicomCase):
        image, geometry = read_series_image(case.series)
        return image[None].astype(np.float32, copy=False), geometry
    files = list(case.image_files)
    if len(files) != num_channels:
        raise MedsegError(f"{files[0]}: case has {len(files)} channel file(s), the model expects {num_channels}")
    for f in files:  # SimpleITK reads truncated NIfTI silently (garbage voxels) and NaN as 0
        problem, nonfinite = nifti_raw_check(Path(f))
        if problem:
            raise MedsegError(f"{f}: unreadable or truncated image file ({problem})")
        if nonfinite and any(nonfinite):
            raise MedsegError(nonfinite_message(f, *nonfinite))
    return read_channels(files)


def nonfinite_message(path: Path, n_nan: int, n_inf: int) -> str:
    """The message for an image holding NaN or Inf voxels."""
    return (
        f"{path}: holds {n_nan} NaN and {n_inf} Inf voxel(s); replace them (e.g. by the background "
        "intensity) and predict the case again"
    )


def case_error_message(exc: BaseException) -> str:
    """One line for a case that failed with ``exc`` (MedsegError text; an OSError's file and reason)."""
    if isinstance(exc, MedsegError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"
