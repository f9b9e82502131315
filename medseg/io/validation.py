"""Dataset validation: read every file of a dataset and report every problem at once.

:func:`validate_dataset` checks what :func:`medseg.io.dataset.load_dataset` located: missing,
unreadable or truncated files, dimensionality, channel and image/label geometry agreement, NaN/Inf
voxels and undeclared label values. Each problem names the case and the file. NIfTI files' raw bytes are
checked by :func:`medseg.io.nifti_raw.nifti_raw_check` (re-exported here for its callers on prediction inputs).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.errors import DatasetError
from medseg.io.dataset import _CHANNEL_RE, Case, DatasetInfo, _image_files_in, _suffix_of
from medseg.io.image import ImageGeometry, strip_suffix
from medseg.io.nifti_raw import nifti_raw_check
from medseg.io.parallel import map_cases

logger = logging.getLogger(__name__)

#: Geometry tolerance (mm for spacing/origin, absolute for direction cosines) between files of one case.
GEOMETRY_TOLERANCE = 1e-3
#: Declared label ids are listed in full in messages up to this many.
_MAX_IDS_IN_MESSAGE = 20


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _sitk_error_detail(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Exception thrown in SimpleITK", "Reason:"))] or lines
    detail = lines[-1] if lines else ""
    detail = re.sub(r"^(sitk::ERROR:|ITK ERROR:)\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", detail)
    detail = re.sub(r"^\[\w+\]\s*\w+:\s*", "", detail)
    return detail[:200]


_IMAGE_IO = {
    ".nii.gz": "NiftiImageIO",
    ".nii": "NiftiImageIO",
    ".nrrd": "NrrdImageIO",
    ".mha": "MetaImageIO",
    ".mhd": "MetaImageIO",
}


@dataclass
class _FileRead:
    """What validation needs from one file: header facts, and the voxels when they were read."""

    ndim: int
    components: int
    size_xyz: tuple[int, ...]
    geometry: ImageGeometry | None  # None unless ndim is 2 or 3 (ImageGeometry describes those)
    array: np.ndarray | None  # (Z, Y, X) view, only when the voxels were read
    nonfinite: tuple[int, int]  # (NaN count, Inf count), counted in the file itself
    image: sitk.Image | None  # keeps the memory behind ``array`` alive


def _reader(path: Path, io_name: str | None) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    if io_name:
        reader.SetImageIO(io_name)
    reader.SetFileName(str(path))
    return reader


def _read_for_validation(path: Path, need_voxels: bool) -> tuple[_FileRead | None, str | None]:
    """Read ``path`` (header only for NIfTI images, whose raw voxels are checked here directly).

    The ImageIO is chosen from the file ending, which skips SimpleITK's format probing.

    Returns:
        ``(read, None)`` or ``(None, problem)``.
    """
    if not path.is_file():
        return None, "file not found"
    io_name = _IMAGE_IO.get(_suffix_of(path.name))
    header_only = not need_voxels and io_name == "NiftiImageIO"
    image = None
    try:
        try:
            reader = _reader(path, io_name)
            if header_only:
                reader.ReadImageInformation()
            else:
                image = reader.Execute()
        except RuntimeError as exc:
            if io_name is None or "not recognized" not in str(exc):
                raise
            try:  # content does not match the ending: let SimpleITK probe the format
                reader, header_only = _reader(path, None), False
                image = reader.Execute()
            except RuntimeError:
                raise exc from None
    except Exception as exc:  # SimpleITK raises RuntimeError with a C++ trace
        return None, f"unreadable or truncated image file ({_sitk_error_detail(exc)})"
    problem, nonfinite = nifti_raw_check(path)
    if problem:
        return None, f"unreadable or truncated image file ({problem})"
    if image is not None:
        ndim, components = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
        array = sitk.GetArrayViewFromImage(image)
        if nonfinite is None:
            nonfinite = (0, 0)
            if array.dtype.kind == "f" and not np.isfinite(array.sum(dtype=np.float64)):
                nonfinite = (int(np.isnan(array).sum()), int(np.isinf(array).sum()))
    else:
        ndim, components, array = reader.GetDimension(), reader.GetNumberOfComponents(), None
    source = image if image is not None else reader
    geometry = ImageGeometry.from_sitk(source) if ndim in (2, 3) else None
    return _FileRead(ndim, components, tuple(source.GetSize()), geometry, array, nonfinite or (0, 0), image), None


def _mismatch(geo: ImageGeometry, ref: ImageGeometry, shape_problem: str, geometry_problem: str) -> str | None:
    """``shape_problem`` when the shapes differ, else ``"<geometry_problem>: <differences>"`` when spacing,
    origin or direction differ beyond :data:`GEOMETRY_TOLERANCE`, else None (the files agree)."""
    if geo.shape != ref.shape:
        return shape_problem
    diffs = geo.matches(ref, tol=GEOMETRY_TOLERANCE)
    return f"{geometry_problem}: " + "; ".join(diffs) if diffs else None


def _dim_problem(read: _FileRead) -> str | None:
    if read.components != 1:
        return (
            f"has {read.components} components per voxel (vector/RGB image); "
            "store each channel as its own file (CASE_0000, CASE_0001, ...)"
        )
    if read.ndim not in (2, 3):
        shape = list(reversed(read.size_xyz))
        return (
            f"wrong dimensionality: {read.ndim}D image of shape {shape}; medseg reads 2D or 3D "
            "images, one file per channel (split a 4D multi-channel file into CASE_0000, CASE_0001, ...)"
        )
    return None


def _label_values_problems(arr: np.ndarray, declared: frozenset[int]) -> list[str]:
    problems = []
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            problems.append(f"{int(arr.size - finite.sum())} NaN/Inf value(s) in the label map")
            arr = arr[finite]
        as_int = arr.astype(np.int64)
        bad = as_int != arr
        if bad.any():
            examples = np.unique(arr[bad])[:5]
            problems.append(
                "non-integer label values (e.g. "
                + ", ".join(f"{v:g}" for v in examples)
                + f"; {int(bad.sum())} voxels); label maps must hold integer class ids"
            )
            as_int = as_int[~bad]
        arr = as_int
    elif arr.dtype.kind not in "iub":
        problems.append(f"label map has non-numeric voxel type {arr.dtype}")
        return problems
    if arr.size == 0:
        return problems
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi < (1 << 20):
        values = np.flatnonzero(np.bincount(arr.ravel(), minlength=1))
    else:
        values = np.unique(arr)
    undeclared = sorted(int(v) for v in values if int(v) not in declared)
    if undeclared:
        shown = undeclared[:_MAX_IDS_IN_MESSAGE]
        more = f" and {len(undeclared) - len(shown)} more" if len(undeclared) > len(shown) else ""
        dec = sorted(declared)
        dec_txt = (
            ", ".join(map(str, dec))
            if len(dec) <= _MAX_IDS_IN_MESSAGE
            else ", ".join(map(str, dec[:_MAX_IDS_IN_MESSAGE])) + f", ... ({len(dec)} ids)"
        )
        problems.append(f"label values {shown}{more} are not declared in dataset.json (declared: {dec_txt})")
    return problems


def _check_case(case: Case, root: Path, label_ids: tuple[int, ...], num_channels: int) -> tuple[list[str], int | None]:
    """Validate one case. Returns ``(problems, ndim)``; each problem names the case and the file."""
    problems: list[str] = []
    cid = case.case_id

    def report(path: Path, msg: str) -> None:
        problems.append(f"case {cid}: {_rel(path, root)}: {msg}")

    if len(case.image_files) != num_channels:
        first = case.image_files[0] if case.image_files else root
        report(
            first, f"case has {len(case.image_files)} image file(s) but dataset.json declares {num_channels} channel(s)"
        )
    ref_geo: ImageGeometry | None = None
    ref_file = Path()  # channel 0's file: set with ref_geo, read only once ref_geo is set
    ndim: int | None = None
    for ch, path in enumerate(case.image_files):
        if not path.is_file():
            msg = f"missing channel file (channel {ch})"
            single = path.parent / f"{cid}{_suffix_of(path.name)}"
            if num_channels > 1 and single.is_file():
                msg += (
                    f"; found {single.name}, which looks like one multi-channel file: split it into one file per "
                    f"channel ({cid}_0000{_suffix_of(path.name)}, {cid}_0001{_suffix_of(path.name)}, ...)"
                )
            report(path, msg)
            continue
        read, err = _read_for_validation(path, need_voxels=False)
        if read is None:
            report(path, err or "unreadable")
            continue
        dim_err = _dim_problem(read)
        if dim_err:
            report(path, dim_err)
            continue
        geo = read.geometry
        assert geo is not None
        if any(read.nonfinite):
            report(path, f"image contains {read.nonfinite[0]} NaN and {read.nonfinite[1]} Inf voxel(s)")
        if ref_geo is None:
            ref_geo, ref_file, ndim = geo, path, geo.ndim
        elif geo.ndim != ref_geo.ndim:
            report(path, f"channel {ch} is {geo.ndim}D but channel 0 ({ref_file.name}) is {ref_geo.ndim}D")
        elif problem := _mismatch(
            geo,
            ref_geo,
            f"channel {ch} shape {list(geo.shape)} differs from channel 0 ({ref_file.name}) "
            f"shape {list(ref_geo.shape)}",
            f"geometry mismatch between channel {ch} and channel 0 ({ref_file.name})",
        ):
            report(path, problem)

    if case.label_file is not None:
        lpath = case.label_file
        if not lpath.is_file():
            report(lpath, "missing label file")
        else:
            label, err = _read_for_validation(lpath, need_voxels=True)
            if label is None:
                report(lpath, err or "unreadable")
            elif (dim_err := _dim_problem(label)) is not None:
                report(lpath, dim_err)
            else:
                if any(label.nonfinite):
                    report(
                        lpath,
                        f"label map contains {label.nonfinite[0]} NaN and {label.nonfinite[1]} Inf "
                        "voxel(s); label maps must hold integer class ids",
                    )
                lgeo = label.geometry
                assert lgeo is not None and label.array is not None
                if ref_geo is not None and (
                    problem := _mismatch(
                        lgeo,
                        ref_geo,
                        f"image/label shape mismatch: label {list(lgeo.shape)} vs image {list(ref_geo.shape)} "
                        f"({ref_file.name})",
                        f"geometry mismatch between image ({ref_file.name}) and label",
                    )
                ):
                    report(lpath, problem)
                for msg in _label_values_problems(label.array, frozenset(label_ids)):
                    report(lpath, msg)
    return problems, ndim


def _stray_channel_files(ds: DatasetInfo) -> list[str]:
    """Channel files beyond the declared channel count (``CASE_0001`` when one channel is declared)."""
    problems = []
    ids = {c.case_id for c in ds.cases}
    used = {p.name for c in ds.cases for p in c.image_files}
    for folder in {p.parent for c in ds.cases for p in c.image_files}:
        for p in _image_files_in(folder):
            m = _CHANNEL_RE.match(strip_suffix(p.name))
            if p.name in used or not m or m.group("case") not in ids:
                continue
            ch = int(m.group("channel"))
            if ch >= ds.num_channels:
                problems.append(
                    f"case {m.group('case')}: {_rel(p, ds.root)}: channel file {ch} but dataset.json "
                    f"declares {ds.num_channels} channel(s) ({', '.join(ds.channel_names)})"
                )
    return sorted(problems)


def validate_dataset(ds: DatasetInfo, num_workers: int = 1, progress: bool = True) -> None:
    """Read every file of ``ds`` and check it; report every problem at once.

    Checks: empty dataset; duplicate case ids; missing, unreadable or truncated image/label files;
    channel files beyond the declared channels; images that are not 2D/3D single-component; channels
    of one case with different dimensionality, shape or geometry; image/label shape and geometry
    (spacing, origin, direction, tolerance :data:`GEOMETRY_TOLERANCE`) mismatches; NaN/Inf in images;
    non-integer label values and label values not declared in dataset.json; a mix of 2D and 3D cases.

    Args:
        ds: the dataset from :func:`load_dataset`.
        num_workers: processes reading cases in parallel (1: in this process).
        progress: show a tqdm progress bar.

    Raises:
        DatasetError: with one line per problem, each naming the case and the file.
    """
    root = Path(ds.root)
    if not ds.cases:
        raise DatasetError(
            [
                f"{root}: no training cases found (dataset.json has no 'training' entries and labelsTr/ and "
                "imagesTr/ hold no image files)"
            ],
            header=f"dataset {root} failed validation",
        )
    problems: list[str] = []
    counts = Counter(c.case_id for c in ds.cases)
    for cid, n in counts.items():
        if n > 1:
            problems.append(f"case {cid}: duplicate case id, listed {n} times in {_rel(root / 'dataset.json', root)}")
    problems += _stray_channel_files(ds)

    # each distinct case is read once (duplicates would only repeat the same messages)
    unique_cases = list({(c.case_id, c.image_files, c.label_file): c for c in ds.cases}.values())
    check = partial(_check_case, root=root, label_ids=tuple(ds.declared_label_ids), num_channels=ds.num_channels)
    results = map_cases(check, unique_cases, num_workers, desc="validate", progress=progress)

    ndims: dict[int, list[str]] = {}
    for case, (case_problems, ndim) in zip(unique_cases, results):
        problems += case_problems
        if ndim is not None:
            ndims.setdefault(ndim, []).append(case.case_id)
    if len(ndims) > 1:
        summary = "; ".join(f"{d}D: {len(ids)} case(s), e.g. {', '.join(ids[:3])}" for d, ids in sorted(ndims.items()))
        problems.append(f"{root}: dataset mixes 2D and 3D images ({summary}); wrong dimensionality")
    if problems:
        raise DatasetError(problems, header=f"dataset {root} failed validation")
    logger.info("dataset %s: %d cases valid", root, len(unique_cases))


__all__ = ["GEOMETRY_TOLERANCE", "nifti_raw_check", "validate_dataset"]
