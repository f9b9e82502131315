"""What the per-case report writers (``--statistics``, ``--preview``) share: the case's input image, and the cases
a prediction skipped because their segmentation existed.

:func:`read_case_image` reads the input intensities of a :class:`~medseg.inference.case_output.FinishedCase`
(its first channel, :attr:`~medseg.inference.case_output.FinishedCase.reference`) on the label map's grid.

:func:`~medseg.inference.folder.predict_folder` skips a case whose ``OUT/CASE<ending>`` exists (unless
``--overwrite``), so the case hooks never see it. :func:`revisit_skipped` gives such a case to the report
writers that lack it (``--statistics``: no row in ``statistics.json``; ``--preview``: no PNG), built from the
**existing segmentation** and the input image: a rerun with ``--statistics`` or ``--preview`` completes the
reports of an earlier run without predicting again. Cases a writer already has are left as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from medseg.errors import MedsegError
from medseg.inference.case_output import FinishedCase
from medseg.inference.folder_cases import case_suffix, find_cases_tolerant
from medseg.io.image import read_image

__all__ = ["ReportWriter", "Revisited", "read_case_image", "revisit_skipped"]

logger = logging.getLogger(__name__)


def read_case_image(case: FinishedCase) -> np.ndarray:
    """The input image of ``case`` (:meth:`FinishedCase.input_image`: first channel, the whole series for DICOM
    input; read once for every hook of the case, read-only), ``(Z, Y, X)`` (or ``(Y, X)``) in the file's dtype.

    Raises:
        MedsegError: the image is unreadable, or its shape differs from the label map's.
    """
    image = case.input_image()
    if tuple(image.shape) != tuple(case.labels.shape):
        raise MedsegError(
            f"{case.reference}: image shape {list(image.shape)} differs from the segmentation's "
            f"{list(case.labels.shape)}"
        )
    return image


class ReportWriter(Protocol):
    """A case hook that can also report a case from its existing segmentation."""

    def missing(self, case_ids: Iterable[str]) -> list[str]:
        """The cases of ``case_ids`` it has no report of."""
        ...

    def revisit(self, case: FinishedCase) -> None:
        """Report a case whose segmentation existed."""
        ...


@dataclass
class Revisited:
    """What :func:`revisit_skipped` did.

    Attributes:
        done: case ids reported from their existing segmentation.
        failed: case id -> message, for cases that could not be reported.
    """

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def revisit_skipped(
    input_dir: Path,
    output_dir: Path,
    skipped: Sequence[str],
    num_channels: int,
    label_ids: Sequence[int],
    writers: Sequence[ReportWriter],
) -> Revisited:
    """Report the skipped cases that a writer lacks, from their existing segmentations.

    Args:
        input_dir: the prediction's input folder (the cases' images).
        output_dir: its output folder (the existing ``CASE<ending>`` segmentations).
        skipped: case ids the prediction skipped.
        num_channels: the model's input channels (to find the cases' files).
        label_ids: the model's label ids, background first.
        writers: the report writers (e.g. :class:`~medseg.postprocessing.statistics_output.StatisticsWriter`).

    Returns:
        :class:`Revisited`; an unreadable segmentation or image fails its case only.
    """
    wanted = [(w, set(w.missing(skipped))) for w in writers]
    needed = sorted(set().union(*(ids for _, ids in wanted)))
    result = Revisited()
    if not needed:
        return result
    cases, _ = find_cases_tolerant(Path(input_dir), num_channels)
    by_id = {c.case_id: c for c in cases}
    for case_id in needed:
        case = by_id.get(case_id)
        if case is None:
            result.failed[case_id] = f"{input_dir}: its image is no longer found"
            continue
        reference = Path(case.image_files[0])
        target = Path(output_dir) / f"{case_id}{case_suffix(reference)}"
        try:
            labels, geometry = read_image(target)
            finished = FinishedCase(case_id, labels, geometry, tuple(label_ids), None, target, reference)
            for writer, ids in wanted:
                if case_id in ids:
                    writer.revisit(finished)
        except MedsegError as exc:
            result.failed[case_id] = str(exc)
            logger.warning("%s: %s", case_id, exc)
            continue
        result.done.append(case_id)
    return result
