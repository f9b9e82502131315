"""Where a model's training range comes from: the input guard's reference (:class:`TrainingRange`) for a work
folder (its ``fingerprint.json``) or a bundle (its ``training_range.json``)."""

from __future__ import annotations

import logging
from pathlib import Path

from medseg.errors import MedsegError
from medseg.fingerprint import Fingerprint
from medseg.inference.bundle import bundle_file_error, read_bundle_text
from medseg.inference.input_guard import TrainingRange
from medseg.io.workdir import BundleLayout, WorkDir

__all__ = ["model_training_range", "read_training_range"]

logger = logging.getLogger(__name__)


def read_training_range(path: str | Path) -> TrainingRange | None:
    """The bundle's training range (``training_range.json``), or None for a bundle written without one.

    Raises:
        BundleError: not a readable bundle, or a malformed ``training_range.json``.
    """
    text = read_bundle_text(path, BundleLayout.TRAINING_RANGE)
    if text is None:
        return None
    try:
        return TrainingRange.from_json(text, f"{path}:{BundleLayout.TRAINING_RANGE}")
    except MedsegError as exc:
        raise bundle_file_error(Path(path), BundleLayout.TRAINING_RANGE, f"is malformed ({exc})") from None


def model_training_range(model: Path) -> TrainingRange | None:
    """What the input guard compares each image with: a bundle's ``training_range.json`` or a work folder's
    fingerprint; None (the guard then checks only the plan's median spacing, said in one info line) without.

    Raises:
        BundleError: a bundle that cannot be read, or a malformed ``training_range.json``.
    """
    if model.is_file():
        found = read_training_range(model)
    else:
        path = WorkDir(model).fingerprint
        found = TrainingRange.from_fingerprint(Fingerprint.load(path)) if path.is_file() else None
    if found is None:
        logger.info("%s records no training range (older medseg): the input guard checks only the spacing", model)
    return found
