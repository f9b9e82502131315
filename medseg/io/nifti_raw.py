"""Raw checks of NIfTI files: what SimpleITK reads without complaint although the file is damaged.

SimpleITK (nifticlib) accepts a truncated NIfTI file (the missing voxels are garbage) and silently turns
NaN/Inf voxels into 0. :func:`nifti_raw_check` reads the NIfTI-1/-2 header and the (decompressed) voxel
bytes itself; dataset validation and prediction inputs both use it.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class _NiftiHeader:
    endian: str
    datatype: int
    vox_offset: int
    nbytes: int  # bytes of voxel data the header announces


def _parse_nifti_header(header: bytes) -> _NiftiHeader | None:
    """The few NIfTI-1/-2 header fields needed to check a file's size and raw values (None if not NIfTI)."""
    if len(header) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540 and len(header) >= 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    nvox = int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]], dtype=np.int64))
    return _NiftiHeader(endian, int(datatype), max(int(vox_offset), sizeof_hdr), nvox * int(bitpix) // 8)


#: NIfTI datatype codes of real floating-point voxels -> numpy type.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def nifti_raw_check(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """Check a NIfTI file's raw bytes for what SimpleITK hides.

    SimpleITK (nifticlib) reads a truncated NIfTI file without complaint (missing voxels are garbage)
    and silently replaces NaN/Inf voxels by 0. This reads the (decompressed) file itself.

    Returns:
        ``(problem, nonfinite)``: ``problem`` describes truncation/corruption (else None); ``nonfinite``
        is ``(n_nan, n_inf)`` for floating-point files (else None). ``(None, None)`` for other formats.
    """
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None, None
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
            total, header = len(raw), raw[:540]
        else:
            total = path.stat().st_size
            with open(path, "rb") as fh:
                header = fh.read(540)
            raw = None
    except (EOFError, OSError, zlib.error) as exc:
        return f"compressed data truncated or corrupt: {exc}", None
    hdr = _parse_nifti_header(header)
    if hdr is None:
        return None, None
    if total < hdr.vox_offset + hdr.nbytes:
        return f"file ends after {total} bytes; its header announces {hdr.vox_offset + hdr.nbytes}", None
    kind = _NIFTI_FLOATS.get(hdr.datatype)
    if kind is None:
        return None, None
    if raw is None:
        with open(path, "rb") as fh:
            fh.seek(hdr.vox_offset)
            raw = fh.read(hdr.nbytes)
        offset = 0
    else:
        offset = hdr.vox_offset
    values = np.frombuffer(raw, dtype=np.dtype(hdr.endian + kind), count=hdr.nbytes // int(kind[1]), offset=offset)
    if np.isfinite(values.sum(dtype=np.float64)):
        return None, (0, 0)
    return None, (int(np.isnan(values).sum()), int(np.isinf(values).sum()))


__all__ = ["nifti_raw_check"]
