"""Small synthetic DICOM series for tests: real CT headers (``../shared/data/dicom/ct_3slice``) with tiny pixel data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from tests.conftest import SHARED_DATA

DICOM = SHARED_DATA / "dicom"
TEMPLATE = DICOM / "ct_3slice" / "01.dcm"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_slice(
    path: Path,
    stored: np.ndarray,
    position: Sequence[float],
    series_uid: str,
    orientation: Sequence[float] = AXIAL,
    instance: int = 1,
    patient: str = "P1",
    description: str = "synthetic",
    number: int = 7,
) -> str:
    """Write one CT file holding ``stored`` (int16 ``(Y, X)``, or ``(F, Y, X)`` for a multi-frame object; the
    template's rescale gives HU = stored - 1024). Returns its SOPInstanceUID."""
    ds = pydicom.dcmread(TEMPLATE)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    if stored.ndim == 3:
        ds.NumberOfFrames = int(stored.shape[0])
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.int16).tobytes()
    ds.InstanceNumber, ds.PatientID, ds.SeriesDescription, ds.SeriesNumber = instance, patient, description, number
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return str(ds.SOPInstanceUID)


def write_series(
    folder: Path,
    z_positions: Sequence[float],
    shape: tuple[int, int] = (6, 5),
    orientations: Sequence[Sequence[float]] | None = None,
    seed: int = 0,
    **fields,
) -> tuple[str, np.ndarray]:
    """Write one slice per z position (files in shuffled order) into ``folder``.

    Returns:
        ``(series_uid, hu)``: the series' UID and the HU volume ``(Z, Y, X)`` in ascending z order.
    """
    rng = np.random.default_rng(seed)
    uid = generate_uid()
    stored = rng.integers(0, 2000, size=(len(z_positions), *shape)).astype(np.int16)
    order = rng.permutation(len(z_positions))
    for k in order:
        orient = orientations[k] if orientations is not None else AXIAL
        write_slice(
            folder / f"im{k:03d}.dcm", stored[k], (-10.0, 20.0, z_positions[k]), uid, orient, int(k) + 1, **fields
        )
    ascending = np.argsort(z_positions)
    return uid, stored[ascending].astype(np.int32) - 1024
