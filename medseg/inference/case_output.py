"""What :func:`~medseg.inference.folder.predict_folder` hands a caller for each finished case, before writing it.

A :data:`CaseHook` lets a layer above inference derive more outputs from a case (e.g. the instance maps of
:mod:`medseg.postprocessing.instance_output`) while the case's probabilities are still in memory, without
inference knowing about them: the hook receives a :class:`FinishedCase`, one case at a time (on a writer
thread), and nothing of it is kept afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.inference.case_grid import Inferred, class_probability
from medseg.io.dicom_series import DicomSeries, read_series_image
from medseg.io.image import ImageGeometry, read_image
from medseg.planning.plan import Plan

__all__ = ["CaseHook", "CombinedHook", "FinishedCase", "combine_hooks", "finished_case"]


@dataclass(frozen=True)
class FinishedCase:
    """A predicted case, about to be written.

    Attributes:
        case_id: the case's name.
        labels: the label map that is written, original label ids ``(Z, Y, X)`` (postprocessed).
        geometry: the input image's geometry (the label map's).
        label_ids: the model's original label ids, in class-index order (background first).
        class_probability: mean probability over the ensemble (and TTA) of one label id on the original
            grid, float32 ``(Z, Y, X)`` in [0, 1] (computed on request, one class at a time); None for region
            plans, whose outputs are regions rather than classes.
        segmentation_path: where ``labels`` is written (``OUT/CASE<ending>``).
        reference: the input image (first channel), whose NIfTI header outputs may copy (a DICOM case: the
            series' first file).
        source_series: for a DICOM input, the series (files and SOP instance UIDs in the order of ``labels``'
            ``z`` axis) that a DICOM SEG/RTSTRUCT of the case references; None for image-file input.
        input_warnings: the input guard's one-line warnings for the case's image (:mod:`medseg.inference.input_guard`).
    """

    case_id: str
    labels: np.ndarray
    geometry: ImageGeometry
    label_ids: tuple[int, ...]
    class_probability: Callable[[int], np.ndarray] | None
    segmentation_path: Path
    reference: Path
    source_series: DicomSeries | None = None
    input_warnings: tuple[str, ...] = ()
    _image: list[np.ndarray] = field(default_factory=list, init=False, repr=False, compare=False)

    def input_image(self) -> np.ndarray:
        """The input image (first channel; a DICOM case: its whole series, rescaled), ``(Z, Y, X)`` (or ``(Y, X)``)
        in the file's dtype: read once for all the hooks of the case, and read-only, since they share it.

        Raises:
            MedsegError: the image or series is unreadable.
        """
        if not self._image:
            if self.source_series is not None:  # the reference is only the series' first file
                image, _ = read_series_image(self.source_series)
            else:
                image, _ = read_image(self.reference)
            image.flags.writeable = False
            self._image.append(image)
        return self._image[0]


#: Called with every finished case before its segmentation is written; an exception fails the case (its
#: segmentation is then not written, so a rerun predicts it again).
CaseHook = Callable[[FinishedCase], None]


@dataclass(frozen=True)
class CombinedHook:
    """A :data:`CaseHook` calling each of ``hooks`` in turn; the first exception stops the others and fails the case.

    Attributes:
        hooks: the hooks, in calling order.
    """

    hooks: tuple[CaseHook, ...]

    def __call__(self, case: FinishedCase) -> None:
        for hook in self.hooks:
            hook(case)


def combine_hooks(hooks: Sequence[CaseHook | None]) -> CaseHook | None:
    """One :data:`CaseHook` calling each of ``hooks`` in turn (None entries left out).

    Returns:
        None when no hook is given, the hook itself when one is, else a :class:`CombinedHook` of them in order.
    """
    chosen = tuple(h for h in hooks if h is not None)
    if len(chosen) <= 1:
        return chosen[0] if chosen else None
    return CombinedHook(chosen)


def finished_case(
    case_id: str,
    labels: np.ndarray,
    geometry: ImageGeometry,
    segmentation_path: Path,
    reference: Path,
    plan: Plan,
    probabilities: np.ndarray | None,
    inferred: Inferred,
    source_series: DicomSeries | None = None,
    input_warnings: tuple[str, ...] = (),
) -> FinishedCase:
    """The :class:`FinishedCase` of a predicted case.

    Args:
        case_id, labels, geometry, segmentation_path, reference, source_series, input_warnings: as in
            :class:`FinishedCase`.
        plan: the members' plan (label ids; region plans get no class probabilities).
        probabilities: the combined probabilities ``(K, Z, Y, X)`` when they were computed anyway, else None.
        inferred: the members' outputs per configuration (used when ``probabilities`` is None; must stay
            alive until the hook returns).
    """
    label_ids = tuple(int(i) for i in plan.label_ids)
    index = {label: k for k, label in enumerate(label_ids)}
    probability: Callable[[int], np.ndarray] | None = None
    if not plan.is_region_based:
        if probabilities is not None:
            probs = probabilities

            def probability(label: int) -> np.ndarray:
                return np.asarray(probs[index[label]], dtype=np.float32)

        else:

            def probability(label: int) -> np.ndarray:
                return class_probability(inferred, plan, index[label])

    return FinishedCase(
        case_id, labels, geometry, label_ids, probability, segmentation_path, reference, source_series, input_warnings
    )
