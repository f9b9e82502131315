"""Writing predictions: label maps with the input's exact geometry, probabilities as ``.npz``."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg.faults import maybe_fail
from medseg.io.image import ImageGeometry, atomic_write_bytes, temp_file_beside, write_image

logger = logging.getLogger(__name__)


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(".nii.gz") or path.name.endswith(".nii")


def write_segmentation(seg: np.ndarray, geometry: ImageGeometry, path: Path, reference: Path | None = None) -> None:
    """Write a label map atomically with exactly the input's geometry.

    When input and output are NIfTI, the input's header (qform, sform, pixdim, units) is copied, so the
    written file reads back with bit-identical origin, spacing and direction (re-encoding a direction
    through NIfTI's float32 quaternion otherwise changes it by ~1e-8). Any other case, or a header copy
    that would not reproduce ``geometry``, goes through :func:`medseg.io.image.write_image`.

    Args:
        seg: ``(Z, Y, X)`` label ids.
        geometry: the input image's geometry.
        path: output file.
        reference: the input image file (first channel) whose header to copy.

    Raises:
        OSError: the file system refused the write (disk full, permission); ``path`` is left as it was
            and no temporary file remains.
    """
    if reference is not None and _is_nifti(reference) and _is_nifti(path) and seg.ndim == 3:
        try:
            ref = nib.load(str(reference))
            if not isinstance(ref, nib.Nifti1Image):  # also Nifti2Image; caught below: re-encoded instead
                raise ValueError(f"{reference} loads as a {type(ref).__name__}, not a NIfTI image")
            header = ref.header.copy()
            if tuple(header.get_data_shape()[:3]) == tuple(reversed(seg.shape)) and len(header.get_data_shape()) == 3:
                header.set_data_dtype(seg.dtype)
                header.set_slope_inter(1.0, 0.0)
                header["cal_min"], header["cal_max"] = 0.0, 0.0
                path.parent.mkdir(parents=True, exist_ok=True)
                suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
                fd, tmp_name = temp_file_beside(path, suffix)
                os.close(fd)
                tmp = Path(tmp_name)
                try:
                    nib.save(nib.Nifti1Image(np.ascontiguousarray(seg.transpose(2, 1, 0)), None, header=header), tmp)
                    reader = sitk.ImageFileReader()
                    reader.SetFileName(str(tmp))
                    reader.ReadImageInformation()
                    written = ImageGeometry(
                        tuple(reversed(reader.GetSize())),
                        tuple(reversed(reader.GetSpacing())),
                        reader.GetOrigin(),
                        reader.GetDirection(),
                    )
                    if written == geometry:
                        maybe_fail("segmentation_write", path.name)
                        os.replace(tmp, path)
                        return
                    logger.debug("%s: header copy of %s does not reproduce the geometry; re-encoding", path, reference)
                finally:
                    if tmp.exists():
                        tmp.unlink()
        except (OSError, ValueError, RuntimeError, nib.filebasedimages.ImageFileError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # the file system refused (disk full, permission): re-encoding would fail the same way
            logger.debug("%s: cannot copy the header of %s (%s); re-encoding", path, reference, exc)
    write_image(seg, geometry, path)


def write_probabilities(path: Path, probs: np.ndarray, label_ids: Sequence[int]) -> None:
    """Write ``probs`` ``(K, Z, Y, X)`` as float16 ``probabilities`` plus ``label_ids`` to an ``.npz``, atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, probabilities=probs.astype(np.float16), label_ids=np.asarray(label_ids))
    atomic_write_bytes(path, buf.getvalue())
