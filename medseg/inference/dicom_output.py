"""The DICOM outputs of ``medseg predict --output-format dicom-seg|rtstruct``: one DICOM object per input series.

:class:`DicomOutputWriter` is a :data:`~medseg.inference.case_output.CaseHook` for
:func:`~medseg.inference.folder.predict_folder`. For each finished case it asks its ``source_files`` callable for
the DICOM files of the series the case was read from, checks that the case's geometry lies on that series
(:func:`~medseg.io.dicom_slices.slice_order_of`; a volume stacked in the opposite order is reversed) and writes,
before the NIfTI label map ``OUT/CASE<ending>`` (which is still written, and marks the case as done):

- ``dicom-seg``: ``OUT/CASE_seg.dcm``, a DICOM SEG (:func:`~medseg.io.dicom_seg_writer.write_dicom_seg`);
- ``rtstruct``: ``OUT/CASE_rtstruct.dcm``, an RTSTRUCT (:func:`~medseg.io.rtstruct_writer.write_rtstruct`).

Segments/ROIs are named after the model's labels (``dataset.json``), and carry the algorithm (medseg and its
version) and the model's identity. A case without foreground gets no DICOM object (neither format can hold zero
segments); it is listed in :attr:`DicomOutputWriter.empty` and logged, and an earlier run's object of the case
is removed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import medseg
from medseg.errors import ConfigError, DicomError
from medseg.inference.case_output import FinishedCase
from medseg.io.dicom_seg_writer import write_dicom_seg
from medseg.io.dicom_slices import read_source_slices, slice_order_of
from medseg.io.image import IMAGE_SUFFIXES
from medseg.io.rtstruct_writer import write_rtstruct
from medseg.options import OutputFormat, parse_option

__all__ = ["DICOM_OUTPUT_TAILS", "DicomOutputWriter", "SourceFiles", "dicom_output_path"]

logger = logging.getLogger(__name__)

#: Case id -> the DICOM files of the series the case was read from (None: the case was not read from DICOM).
SourceFiles = Callable[[str], Sequence[Path] | None]

#: The DICOM output's file name after the case id, per format.
DICOM_OUTPUT_TAILS: dict[OutputFormat, str] = {
    OutputFormat.DICOM_SEG: "_seg.dcm",
    OutputFormat.RTSTRUCT: "_rtstruct.dcm",
}


def dicom_output_path(segmentation_path: Path, output_format: OutputFormat) -> Path:
    """``OUT/CASE_seg.dcm`` (or ``_rtstruct.dcm``) beside the label map ``OUT/CASE<ending>``."""
    name = segmentation_path.name
    suffix = next((s for s in IMAGE_SUFFIXES if name.endswith(s)), segmentation_path.suffix)
    return segmentation_path.with_name(name[: len(name) - len(suffix)] + DICOM_OUTPUT_TAILS[output_format])


class DicomOutputWriter:
    """Writes each predicted case as a DICOM SEG or RTSTRUCT of its source series.

    Args:
        output_format: :attr:`OutputFormat.DICOM_SEG` or :attr:`OutputFormat.RTSTRUCT`.
        source_files: case id -> its series' files (see :data:`SourceFiles`), for cases that do not carry their
            series (:attr:`FinishedCase.source_series`, set by ``predict_folder`` for DICOM input); None: only those.
        label_names: label id -> name (the model's ``dataset.json`` labels; background may be included).
        model_id: the model's identity, recorded in every object.
        algorithm_version: recorded with the algorithm name ``medseg``.

    Attributes:
        written: case id -> the DICOM file written this run.
        empty: case ids without foreground (nothing written).

    Raises:
        ConfigError: ``output_format`` is NIfTI or not a format.
    """

    def __init__(
        self,
        output_format: OutputFormat | str,
        source_files: SourceFiles | None,
        label_names: Mapping[int, str],
        model_id: str,
        algorithm_version: str = medseg.__version__,
    ) -> None:
        self.output_format = parse_option(OutputFormat, output_format, "--output-format")
        if self.output_format not in DICOM_OUTPUT_TAILS:
            raise ConfigError(f"--output-format {self.output_format} writes no DICOM object")
        self.source_files = source_files
        self.label_names = {int(k): str(v) for k, v in label_names.items() if int(k) != 0}
        self.model_id = model_id
        self.algorithm_version = algorithm_version
        self.written: dict[str, Path] = {}
        self.empty: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, case: FinishedCase) -> None:
        """Write the DICOM object of ``case`` (called on a writer thread).

        Raises:
            DicomError: the case was not read from DICOM, its series cannot be read, its geometry is not the
                series', or the object cannot be built (the case then fails and its NIfTI is not written).
        """
        if case.source_series is not None:
            files: Sequence[Path] | None = list(case.source_series.files)
        else:
            files = self.source_files(case.case_id) if self.source_files is not None else None
        if files is None:
            raise DicomError(
                f"{case.case_id}: --output-format {self.output_format} needs DICOM input series; this case was "
                "not read from DICOM"
            )
        if case.labels.ndim != 3:
            raise DicomError(f"{case.case_id}: DICOM output needs a 3D label map, got shape {case.labels.shape}")
        slices = read_source_slices(files)
        order = slice_order_of(case.geometry, slices, case.case_id)
        labels = case.labels if order == 1 else case.labels[::-1]
        target = dicom_output_path(case.segmentation_path, self.output_format)
        write = write_dicom_seg if self.output_format == OutputFormat.DICOM_SEG else write_rtstruct
        result = write(
            labels,
            slices,
            self.label_names,
            target,
            algorithm_name="medseg",
            algorithm_version=self.algorithm_version,
            model_id=self.model_id,
        )
        with self._lock:
            if result is None:
                self.empty.append(case.case_id)
            else:
                self.written[case.case_id] = result.path
        if result is None:
            target.unlink(missing_ok=True)  # an earlier run's object of this case no longer holds
            logger.warning("%s: no foreground predicted; no %s written", case.case_id, self.output_format)
