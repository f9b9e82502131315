"""The input and output folders of ``medseg predict``: checks, and finding the cases to predict.

:func:`find_cases_tolerant` finds the cases of an input folder (one image file per channel,
``<case>_<channel:04d>.<suffix>``) and reports the malformed ones instead of refusing the folder;
:func:`check_folders` / :func:`check_writable` refuse unusable folders before any case is predicted;
:func:`spacing_warning` flags images whose spacing (mm) is far from the training data's.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg.errors import DatasetError, MedsegError
from medseg.io.dataset import find_prediction_cases
from medseg.io.image import IMAGE_SUFFIXES, has_image_suffix, strip_suffix
from medseg.planning.plan import Plan

__all__ = [
    "case_error_message",
    "case_suffix",
    "check_folders",
    "check_writable",
    "find_cases_tolerant",
    "nonfinite_message",
    "spacing_warning",
]


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


def spacing_warning(case_id: str, spacing: Sequence[float], plan: Plan) -> str | None:
    """A message when ``spacing`` (mm) is > 2x or < 0.5x the plan's median training spacing on any axis."""
    ref = tuple(plan.original_median_spacing)[-len(spacing) :]
    ratios = [s / r for s, r in zip(spacing, ref) if r > 0]
    if any(q > 2.0 or q < 0.5 for q in ratios):
        return (
            f"{case_id}: spacing {[round(float(s), 3) for s in spacing]} mm is far from the training data's "
            f"median {[round(float(r), 3) for r in ref]} mm; the segmentation may be poor"
        )
    return None


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
