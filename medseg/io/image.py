"""Reading and writing images while keeping their geometry exactly.

Array layout convention everywhere in medseg: the order SimpleITK's ``GetArrayFromImage`` returns,
i.e. ``(Z, Y, X)`` for 3D and ``(Y, X)`` for 2D images, and *spacing in the same order*, in mm.
Origin and direction are kept in SimpleITK's own (x, y, z) convention, untouched, so that an exported
image has exactly the input's origin, spacing and direction.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.codec import from_json_dict, to_json_dict

#: File endings medseg reads (through SimpleITK).
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def voxel_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel in mL: the product of the spacing (mm per axis) / 1000."""
    return float(np.prod([float(v) for v in spacing])) / 1000.0


def strip_suffix(name: str) -> str:
    """Return ``name`` without a known image suffix (``case_0000.nii.gz`` -> ``case_0000``)."""
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def has_image_suffix(name: str) -> bool:
    """True when ``name`` ends with a suffix medseg can read."""
    return any(name.endswith(s) for s in IMAGE_SUFFIXES)


#: what ``medseg predict --instances`` appends to a case's name for its instance map (``CASE_instances.nii.gz``)
INSTANCE_MAP_TAIL = "_instances"


def instance_map_path(segmentation_path: Path) -> Path:
    """``OUT/CASE_instances<ending>`` beside the semantic map ``OUT/CASE<ending>``."""
    name = segmentation_path.name
    suffix = next((s for s in IMAGE_SUFFIXES if name.endswith(s)), segmentation_path.suffix)
    return segmentation_path.with_name(f"{name[: len(name) - len(suffix)]}{INSTANCE_MAP_TAIL}{suffix}")


class SitkGeometry(Protocol):
    """What :meth:`ImageGeometry.from_sitk` reads: a ``sitk.Image``, or a ``sitk.ImageFileReader`` after
    ``ReadImageInformation``; sizes, spacings and origins in SimpleITK's ``(X, Y, Z)`` order."""

    def GetSize(self) -> Sequence[int]: ...
    def GetSpacing(self) -> Sequence[float]: ...
    def GetOrigin(self) -> Sequence[float]: ...
    def GetDirection(self) -> Sequence[float]: ...


@dataclass(frozen=True)
class ImageGeometry:
    """Where an image lies in physical space.

    Attributes:
        shape: array shape, ``(Z, Y, X)`` or ``(Y, X)``.
        spacing: voxel size in mm, same order as ``shape``.
        origin: physical position of the first voxel, SimpleITK (x, y, z) order.
        direction: direction cosine matrix, row-major, SimpleITK order (9 or 4 values).
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of Python builtins (:func:`medseg.io.codec.to_json_dict`)."""
        d: dict[str, Any] = to_json_dict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "geometry") -> ImageGeometry:
        """Inverse of :meth:`to_dict`.

        Raises:
            MedsegError: unknown or missing keys, values of the wrong type.
        """
        return from_json_dict(cls, d, where, MedsegError)

    @classmethod
    def from_sitk(cls, image: SitkGeometry) -> ImageGeometry:
        """Geometry of a SimpleITK image, or of a reader after ``ReadImageInformation`` (header only)."""
        size = image.GetSize()
        return cls(
            shape=tuple(int(s) for s in reversed(size)),
            spacing=tuple(float(s) for s in reversed(image.GetSpacing())),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> None:
        """Copy this geometry onto a SimpleITK image (in place)."""
        image.SetSpacing(tuple(float(s) for s in reversed(self.spacing)))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def matches(self, other: ImageGeometry, tol: float = 1e-3) -> list[str]:
        """Return human-readable differences to ``other`` (empty when they agree within ``tol``).

        Spacing and origin are compared with a relative/absolute tolerance of ``tol`` (mm), direction
        cosines with ``tol`` absolute.
        """
        diffs: list[str] = []
        if self.shape != other.shape:
            diffs.append(f"shape {list(self.shape)} vs {list(other.shape)}")
            return diffs
        if not np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol):
            diffs.append(f"spacing {list(self.spacing)} vs {list(other.spacing)}")
        if not np.allclose(self.origin, other.origin, rtol=tol, atol=max(tol, 1e-2)):
            diffs.append(f"origin {list(self.origin)} vs {list(other.origin)}")
        if not np.allclose(self.direction, other.direction, atol=tol):
            diffs.append(f"direction {list(self.direction)} vs {list(other.direction)}")
        return diffs


def read_sitk(path: str | Path) -> sitk.Image:
    """Read an image with SimpleITK, raising :class:`MedsegError` naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"{path}: file not found")
    try:
        return sitk.ReadImage(str(path))
    except Exception as exc:  # SimpleITK raises RuntimeError with a long C++ trace
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "exception" in ln.lower()), first[-1] if first else "")
        raise MedsegError(f"{path}: unreadable or truncated image file ({detail.strip()[:200]})") from None


def read_image(path: str | Path) -> tuple[np.ndarray, ImageGeometry]:
    """Read one single-channel image.

    Returns:
        ``(array, geometry)`` with array in ``(Z, Y, X)`` (or ``(Y, X)``) order, in the file's dtype.

    Raises:
        MedsegError: the file is missing, unreadable, or has more than one component per voxel.
    """
    image = read_sitk(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MedsegError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "store each channel as its own file (CASE_0000, CASE_0001, ...)"
        )
    return sitk.GetArrayFromImage(image), ImageGeometry.from_sitk(image)


def read_channels(paths: list[Path]) -> tuple[np.ndarray, ImageGeometry]:
    """Read the channel files of one case into a float32 array ``(C, Z, Y, X)``.

    The geometry of the first channel is returned; callers validate that the others agree.
    """
    arrays = []
    geometry: ImageGeometry | None = None
    for p in paths:
        arr, geo = read_image(p)
        if geometry is None:
            geometry = geo
        elif arr.shape != geometry.shape:
            raise MedsegError(
                f"{p}: shape {list(arr.shape)} differs from the case's first channel {list(geometry.shape)}"
            )
        arrays.append(arr.astype(np.float32, copy=False))
    assert geometry is not None
    return np.stack(arrays, 0), geometry


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Mode of a new file as ``open()`` creates it; ``mkstemp`` alone gives 0600 (outputs unreadable to others).
_FILE_MODE = 0o666 & ~_read_umask()  # read once at import (changing the umask briefly is not thread-safe)


def temp_file_beside(path: Path, suffix: str = "") -> tuple[int, str]:
    """A new hidden temporary file ``.tmp_*<suffix>`` in ``path``'s folder for an atomic write of ``path``.

    Returns:
        ``(fd, name)`` as :func:`tempfile.mkstemp`, the file given the permissions of a plain ``open()``.
    """
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    return fd, tmp


def _atomic_target(path: Path) -> Path:
    suffix = "".join(s for s in IMAGE_SUFFIXES if path.name.endswith(s))[:7] or path.suffix
    fd, tmp = temp_file_beside(path, suffix or ".nii.gz")
    os.close(fd)
    return Path(tmp)


def write_image(array: np.ndarray, geometry: ImageGeometry, path: str | Path, compress: bool = True) -> None:
    """Write ``array`` (``(Z, Y, X)`` / ``(Y, X)``) with ``geometry`` atomically (tmp file + rename)."""
    path = Path(path)
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    geometry.apply_to(image)
    tmp = _atomic_target(path)
    try:
        sitk.WriteImage(image, str(tmp), compress)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_stream(path: str | Path, write: Callable[[BinaryIO], object], suffix: str = "") -> None:
    """Write ``path`` atomically: ``write(fh)`` fills a temporary file beside it (``suffix`` ending), which is
    fsynced and renamed onto ``path``; on any error the temporary file is removed and ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path, suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to ``path`` atomically (tmp file in the same folder, fsync, rename)."""
    atomic_write_stream(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


def write_like(
    array: np.ndarray, reference: str | Path, path: str | Path, geometry: ImageGeometry | None = None
) -> None:
    """Write ``array`` (``(Z, Y, X)``) with exactly the header geometry of the file ``reference``.

    NIfTI stores orientation as float32 quaternions/affines; re-deriving them from doubles (as a plain
    SimpleITK write does) moves oblique direction cosines by ~1e-8. For NIfTI reference and output, the
    reference's header (qform, sform, codes, pixdim) is copied byte-for-byte through nibabel, so reading
    the output gives bit-identical origin, spacing and direction to reading the reference. Other formats
    fall back to :func:`write_image` with ``geometry`` (read from ``reference`` when None). Atomic.
    """
    reference, path = Path(reference), Path(path)
    if not (_is_nifti(reference) and _is_nifti(path)):
        if geometry is None:
            geometry = ImageGeometry.from_sitk(read_sitk(reference))
        write_image(array, geometry, path)
        return
    # imported here: nibabel adds ~50 ms (+30%) to importing this module, which every stage does
    import nibabel as nib

    ref = nib.load(str(reference))
    if not isinstance(ref, nib.Nifti1Image):  # also Nifti2Image
        raise ValueError(f"{reference} loads as a {type(ref).__name__}, not a NIfTI image")
    expected = tuple(reversed(ref.shape[:3])) if len(ref.shape) >= 3 else tuple(reversed(ref.shape))
    if tuple(array.shape) != expected[: array.ndim] or array.ndim != len(expected):
        raise ValueError(f"array shape {array.shape} does not match {reference} (array order {expected})")
    header = ref.header.copy()
    header.set_data_dtype(array.dtype)
    data = np.ascontiguousarray(array.transpose(tuple(reversed(range(array.ndim)))))
    img = nib.Nifti1Image(data, None, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    # keep qform/sform exactly as stored in the reference
    img.header["qform_code"] = ref.header["qform_code"]
    img.header["sform_code"] = ref.header["sform_code"]
    for key in (
        "quatern_b",
        "quatern_c",
        "quatern_d",
        "qoffset_x",
        "qoffset_y",
        "qoffset_z",
        "srow_x",
        "srow_y",
        "srow_z",
        "pixdim",
    ):
        img.header[key] = ref.header[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    fd, tmp = temp_file_beside(path, suffix)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
