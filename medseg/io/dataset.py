"""Dataset folders: reading ``dataset.json``, finding each case's files, and validating everything.

Two layouts are accepted:

* Medical Segmentation Decathlon (MSD): ``imagesTr/CASE.nii.gz``, ``labelsTr/CASE.nii.gz`` and a
  ``dataset.json`` with a ``training`` list of ``{"image": ..., "label": ...}`` entries, ``modality``
  (or ``channel_names``) and ``labels`` given either as id -> name (``{"0": "background"}``) or
  name -> id (``{"background": 0}``).
* nnU-Net v2: one file per channel, ``imagesTr/CASE_0000.nii.gz``, ``CASE_0001...``, labels in
  ``labelsTr/CASE.nii.gz``, ``dataset.json`` with ``channel_names``, ``labels`` (name -> id) and
  ``file_ending``; without a ``training`` list the cases are discovered from the folders.

Images are read through SimpleITK (.nii, .nii.gz, .nrrd, .mha, .mhd). :func:`load_dataset` only
parses the description (channels and labels: :mod:`medseg.io.dataset_json`, regions:
:mod:`medseg.io.regions`) and locates files (nothing is read); :func:`validate_dataset` reads every file
and reports every problem at once, each naming the case and the file (see :mod:`medseg.io.validation`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import DatasetError, MedsegError
from medseg.io.dataset_json import parse_channels, parse_labels
from medseg.io.image import IMAGE_SUFFIXES, has_image_suffix, strip_suffix
from medseg.io.regions import is_region_based, parse_region_labels

logger = logging.getLogger(__name__)

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One case of a dataset.

    Attributes:
        case_id: the case identifier (file name without channel suffix and file ending).
        image_files: one file per channel, in channel order (files may be missing until validated).
        label_file: the label map, or None for unlabelled (prediction) cases.
    """

    case_id: str
    image_files: tuple[Path, ...]
    label_file: Path | None


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` and the folder layout say about a dataset.

    Attributes:
        root: dataset folder.
        name: dataset name (``name`` in dataset.json, else the folder name).
        channel_names: modality per channel in channel order, e.g. ``("CT",)`` or ``("T1", "FLAIR")``.
        label_ids: sorted original label ids, background 0 first; gaps allowed (0, 1, 2, 5, 117).
        label_names: names in the order of ``label_ids``.
        cases: the training cases, in dataset.json order (or sorted by case id when discovered).
        file_ending: file ending of the dataset's images, e.g. ``".nii.gz"``.
        ignore_label: id of the label named ``ignore`` (case-insensitive; nnU-Net v2 partial annotation:
            voxels that are not annotated), or None. It is the highest declared id and is *not* in
            ``label_ids``: it is no class, only a mark that a voxel's class is unknown.
        regions: region-based labels (:mod:`medseg.io.regions`): per region the label ids it holds, in
            dataset.json order; empty for ordinary labels. ``label_ids`` then holds every id of any region.
        regions_class_order: the label id written for each region when converting back to a label map.
    """

    root: Path
    name: str
    channel_names: tuple[str, ...]
    label_ids: tuple[int, ...]
    label_names: tuple[str, ...]
    cases: tuple[Case, ...]
    file_ending: str
    ignore_label: int | None = None
    regions: tuple[tuple[int, ...], ...] = ()
    regions_class_order: tuple[int, ...] = ()

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def declared_label_ids(self) -> tuple[int, ...]:
        """Every id a label map may hold: ``label_ids`` plus the ignore label (when declared)."""
        return self.label_ids + (() if self.ignore_label is None else (self.ignore_label,))


def _suffix_of(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def _image_files_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and has_image_suffix(p.name)
    )


def _channel_paths(folder: Path, stem: str, ending: str, num_channels: int) -> tuple[Path, ...]:
    return tuple(folder / f"{stem}_{i:04d}{ending}" for i in range(num_channels))


def _cases_from_training_list(
    root: Path, entries: Any, num_channels: int, ending: str, problems: list[str]
) -> list[Case]:
    if not isinstance(entries, list):
        problems.append('\'training\' must be a list of {"image": ..., "label": ...} entries')
        return []
    cases: list[Case] = []
    for n, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("image", entry.get("label")), str):
            problems.append(f'\'training\' entry {n} is not of the form {{"image": ..., "label": ...}}: {entry!r}')
            continue
        image_rel = entry.get("image")
        label_rel = entry.get("label")
        if image_rel is None:
            assert isinstance(label_rel, str)  # checked above: an entry without "image" names its "label"
            label_path = root / label_rel
            stem = strip_suffix(label_path.name)
            listed = root / "imagesTr" / f"{stem}{_suffix_of(label_path.name) or ending}"
        else:
            listed = root / image_rel
            stem = strip_suffix(listed.name)
            m = _CHANNEL_RE.match(stem)
            if (
                m
                and m.group("channel") == "0000"
                and (not isinstance(label_rel, str) or strip_suffix(Path(label_rel).name) == m.group("case"))
            ):
                stem = m.group("case")  # the entry names the first channel file (nnU-Net naming)
        folder = listed.parent
        suffix = _suffix_of(listed.name) or ending
        if num_channels == 1 and (listed.is_file() or not (folder / f"{stem}_0000{suffix}").is_file()):
            image_files: tuple[Path, ...] = (listed,)
        elif num_channels == 1:
            image_files = (folder / f"{stem}_0000{suffix}",)
        else:
            image_files = _channel_paths(folder, stem, suffix, num_channels)
        label_file = root / label_rel if isinstance(label_rel, str) else root / "labelsTr" / f"{stem}{suffix}"
        cases.append(Case(stem, image_files, label_file))
    return cases


def _cases_from_explicit_mapping(root: Path, mapping: Any, problems: list[str]) -> list[Case]:
    """nnU-Net v2's optional ``"dataset": {case: {"images": [...], "label": ...}}`` listing."""
    if not isinstance(mapping, dict):
        problems.append('\'dataset\' must map case ids to {"images": [...], "label": ...}')
        return []
    cases = []
    for cid, entry in mapping.items():
        images = entry.get("images") if isinstance(entry, dict) else None
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            problems.append(f"'dataset' entry {cid!r} has no list of 'images'")
            continue
        label = entry.get("label")
        cases.append(Case(str(cid), tuple(root / p for p in images), root / label if isinstance(label, str) else None))
    return cases


def _discover_cases(root: Path, num_channels: int, ending: str) -> list[Case]:
    """Cases from ``labelsTr`` and ``imagesTr`` (nnU-Net v2 without a ``training`` list)."""
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    labels = {strip_suffix(p.name): p for p in _image_files_in(labels_dir)}
    channel_files: dict[str, dict[int, Path]] = {}
    single_files: dict[str, Path] = {}
    for p in _image_files_in(images_dir):
        stem = strip_suffix(p.name)
        m = _CHANNEL_RE.match(stem)
        if m and (m.group("case") in labels or stem not in labels):
            channel_files.setdefault(m.group("case"), {})[int(m.group("channel"))] = p
        else:
            single_files[stem] = p
    cases = []
    for cid in sorted(set(labels) | set(channel_files) | set(single_files)):
        if cid in channel_files:
            found = channel_files[cid]
            suffix = _suffix_of(next(iter(found.values())).name)
            image_files = tuple(found.get(i, images_dir / f"{cid}_{i:04d}{suffix}") for i in range(num_channels))
        elif cid in single_files and num_channels == 1:
            image_files = (single_files[cid],)
        else:
            image_files = _channel_paths(images_dir, cid, ending, num_channels)
        cases.append(Case(cid, image_files, labels.get(cid, labels_dir / f"{cid}{ending}")))
    return cases


def load_dataset(root: str | Path) -> DatasetInfo:
    """Parse ``root/dataset.json`` (MSD or nnU-Net v2) and locate every case's files.

    No image is read; files that are listed but missing are kept in the returned cases and reported
    by :func:`validate_dataset`.

    Args:
        root: the dataset folder.

    Returns:
        The :class:`DatasetInfo`; ``label_ids`` sorted with background 0 first.

    Raises:
        DatasetError: the folder or ``dataset.json`` is missing or unreadable, or ``dataset.json``
            is malformed (no channels, labels not integer ids, inconsistent regions, ...). Every
            problem of ``dataset.json`` is listed.
    """
    root = Path(root)
    json_path = root / "dataset.json"
    if not root.is_dir():
        raise DatasetError([f"{root}: dataset folder not found"], header="cannot load dataset")
    if not json_path.is_file():
        raise DatasetError(
            [f"{json_path}: not found; a dataset folder needs a dataset.json"], header="cannot load dataset"
        )

    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError([f"{json_path}: not valid JSON ({exc})"], header="cannot load dataset") from None
    if not isinstance(meta, dict):
        raise DatasetError([f"{json_path}: must hold a JSON object"], header="cannot load dataset")

    problems: list[str] = []
    channel_names = parse_channels(meta, problems)
    regions: tuple[tuple[int, ...], ...] = ()
    regions_class_order: tuple[int, ...] = ()
    if is_region_based(meta):
        label_ids, label_names, ignore_label, regions, regions_class_order = parse_region_labels(meta, problems)
    else:
        label_ids, label_names, ignore_label = parse_labels(meta, problems)

    ending = meta.get("file_ending")
    if ending is not None and ending not in IMAGE_SUFFIXES:
        problems.append(f"'file_ending' {ending!r} is not supported; use one of {', '.join(IMAGE_SUFFIXES)}")
    if problems:
        raise DatasetError([f"{json_path}: {p}" for p in problems], header="invalid dataset.json")
    if ending is None:
        ending = _infer_ending(root, meta)

    num_channels = len(channel_names)
    if isinstance(meta.get("dataset"), dict):
        cases = _cases_from_explicit_mapping(root, meta["dataset"], problems)
    elif "training" in meta:
        cases = _cases_from_training_list(root, meta["training"], num_channels, ending, problems)
    else:
        cases = _discover_cases(root, num_channels, ending)
    if problems:
        raise DatasetError([f"{json_path}: {p}" for p in problems], header="invalid dataset.json")

    ds = DatasetInfo(
        root=root,
        name=str(meta.get("name") or root.name),
        channel_names=channel_names,
        label_ids=label_ids,
        label_names=label_names,
        cases=tuple(cases),
        file_ending=ending,
        ignore_label=ignore_label,
        regions=regions,
        regions_class_order=regions_class_order,
    )
    logger.debug("loaded %s: %d cases, channels %s, labels %s", root, len(cases), channel_names, label_ids)
    return ds


def _infer_ending(root: Path, meta: dict[str, Any]) -> str:
    training = meta.get("training")
    if isinstance(training, list):
        for entry in training:
            name = entry.get("image") or entry.get("label") if isinstance(entry, dict) else entry
            if isinstance(name, str) and _suffix_of(name):
                return _suffix_of(name)
    for folder in (root / "labelsTr", root / "imagesTr"):
        files = _image_files_in(folder)
        if files:
            return _suffix_of(files[0].name)
    return ".nii.gz"


# --------------------------------------------------------------------------------------------------
# prediction inputs
# --------------------------------------------------------------------------------------------------


def find_prediction_cases(folder: str | Path, num_channels: int) -> list[Case]:
    """Find the cases to predict in ``folder``.

    Accepts nnU-Net naming (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... one file per channel) and,
    when the model has one channel, MSD naming (``CASE.nii.gz``). Hidden files are ignored.

    Args:
        folder: folder of images (.nii.gz, .nii, .nrrd, .mha, .mhd).
        num_channels: channels the model expects.

    Returns:
        Cases sorted by case id, ``label_file`` None, ``image_files`` in channel order.

    Raises:
        MedsegError: the folder is missing or holds no images; a case lacks a channel file, has
            more channel files than the model expects, or has no channel suffix although the model
            expects several channels (every such problem is listed).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MedsegError(f"{folder}: input folder not found")
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    files = _image_files_in(folder)
    if not files:
        raise MedsegError(
            f"{folder}: no images found (expected CASE.nii.gz or CASE_0000.nii.gz "
            f"..., with one of {', '.join(IMAGE_SUFFIXES)})"
        )
    grouped: dict[str, dict[int, list[Path]]] = {}
    single: dict[str, list[Path]] = {}
    for p in files:
        stem = strip_suffix(p.name)
        m = _CHANNEL_RE.match(stem)
        if m:
            grouped.setdefault(m.group("case"), {}).setdefault(int(m.group("channel")), []).append(p)
        else:
            single.setdefault(stem, []).append(p)
    if num_channels == 1:
        # CASE_0007 without a CASE_0000 sibling is an MSD-named case whose id ends in digits
        for prefix in [k for k, chans in grouped.items() if 0 not in chans]:
            for ch, paths in grouped.pop(prefix).items():
                single.setdefault(f"{prefix}_{ch:04d}", []).extend(paths)

    problems: list[str] = []
    cases: dict[str, Case] = {}
    for cid, chans in grouped.items():
        suffix = _suffix_of(chans[min(chans)][0].name)
        extra = sorted(c for c in chans if c >= num_channels)
        missing = [c for c in range(num_channels) if c not in chans]
        dup = sorted(c for c, ps in chans.items() if len(ps) > 1)
        if extra:
            names = ", ".join(p.name for c in sorted(chans) for p in chans[c])
            problems.append(
                f"case {cid}: {len(chans)} channel files ({names}) but the model expects {num_channels} channel(s)"
            )
        if missing:
            problems.append(
                f"case {cid}: missing channel file(s) "
                + ", ".join(f"{cid}_{c:04d}{suffix}" for c in missing)
                + f" in {folder} (the model expects {num_channels} channel(s))"
            )
        if dup:
            problems.append(
                f"case {cid}: channel(s) {dup} present with several file endings "
                f"({', '.join(p.name for c in dup for p in chans[c])})"
            )
        if not (extra or missing or dup):
            cases[cid] = Case(cid, tuple(chans[c][0] for c in range(num_channels)), None)
    for cid, paths in single.items():
        if num_channels > 1:
            problems.append(
                f"case {cid}: {paths[0].name} has no channel suffix but the model expects "
                f"{num_channels} channels; name the files {cid}_0000{_suffix_of(paths[0].name)}, "
                f"{cid}_0001{_suffix_of(paths[0].name)}, ..."
            )
        elif len(paths) > 1 or cid in grouped:
            file_names = [p.name for p in paths] + [p.name for ps in grouped.get(cid, {}).values() for p in ps]
            problems.append(f"case {cid}: several files for one case ({', '.join(file_names)})")
            cases.pop(cid, None)
        else:
            cases[cid] = Case(cid, (paths[0],), None)
    if problems:
        raise DatasetError(sorted(problems), header=f"{folder}: cannot form prediction cases")
    return [cases[k] for k in sorted(cases)]


__all__ = ["Case", "DatasetInfo", "find_prediction_cases", "load_dataset"]
