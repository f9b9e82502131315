"""End-to-end comparison of medseg with nnU-Net v2 on one dataset, same split, device and time budget.

Usage (with medseg's environment; nnU-Net v2 lives in its own environment)::

    /work/venv/bin/python scripts/compare_nnunet.py ../shared/data/hippocampus \\
        --budget-minutes 45 --test-cases 20 --device cpu --out results

What it does, in order:

1. Reads DATA (MSD layout with a ``training`` list, or nnU-Net v2 layout ``imagesTr/CASE_0000...``) and
   splits its case ids deterministically (sorted, then shuffled with a fixed seed) into N test cases and a
   training part (``--max-train-cases`` keeps only the first K training cases, for smoke runs). DATA is
   only read: every file is copied into the work folder.
2. Writes the training part once, in nnU-Net v2 raw layout (``DatasetNNN_Name/imagesTr/CASE_0000.nii.gz``,
   ``labelsTr/CASE.nii.gz``, ``dataset.json``). Both tools train from this same folder (medseg reads the
   nnU-Net v2 layout too). The test images go to ``test_images/CASE_0000.nii.gz``, their labels to
   ``reference/`` and are never shown to either tool. Label ids with gaps are renumbered 0..K-1 everywhere
   (nnU-Net requires consecutive ids); class names are kept.
3. nnU-Net: ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres --verify_dataset_integrity``, then
   ``nnUNetv2_train ID 3d_fullres 0 -tr nnUNetTrainer_medsegBudget``, then ``nnUNetv2_predict ... -f 0
   -chk checkpoint_final.pth`` (mirror TTA on, nnU-Net's default).
   nnU-Net has no time-budget option, so the script writes a small trainer class,
   ``nnUNetTrainer_medsegBudget``, into the nnU-Net package (nnU-Net finds trainers by class name inside
   ``nnunetv2/training/nnUNetTrainer``). It is nnU-Net's own trainer with every hyperparameter unchanged
   (250 iterations per epoch, validation every epoch, poly learning rate over 1000 epochs); it only
   (a) stops after the first training iteration that ends past the budget (the clock starts after nnU-Net's
   own start-up: data unpacking, network build) and saves ``checkpoint_final.pth``, and (b) skips the
   final cross-validation prediction, which the comparison does not use. This is "nnU-Net as it is, for
   M minutes", which is what a user with M minutes gets. ``--nnunet-schedule budget`` instead anneals the
   learning rate over the elapsed fraction of the budget (poly, exponent 0.9), the same idea medseg uses,
   for a comparison that does not penalise nnU-Net's 1000-epoch schedule.
4. medseg: ``medseg plan TRAIN -o WORK --device DEV --time-budget M``, ``medseg train WORK --fold 0
   --time-budget M --device DEV --no-validation``, ``medseg predict -i TEST -o PRED -m WORK --folds 0``
   (mirror TTA on, medseg's default).
5. Evaluates both prediction folders with metric code in this file (numpy + scipy, independent of both
   tools): Dice per class, and HD95 in mm per class (the larger of the two directed 95th percentiles of
   surface-to-surface distances, computed with ``distance_transform_edt(sampling=spacing)``).
   Conventions: a class absent from both prediction and reference is left out of the means (NaN); absent
   from exactly one of them gives Dice 0 and HD95 = the image diagonal in mm. A missing or unreadable
   prediction, or one whose grid differs from the reference, counts as all-background.
6. Prints one table (nnU-Net, medseg, ratio medseg/nnU-Net) and writes ``compare_nnunet.json`` and
   ``compare_nnunet.md`` into ``--out``.

Timings are wall clock (``time.perf_counter``) of each command as a subprocess. Training throughput is
iterations done divided by the tool's own training-loop seconds when it reports them, else by the stage's
wall time. Peak RAM is the highest sum of proportional set sizes (PSS, from ``/proc``) over the command's
whole process tree (data-loading workers included), sampled every 0.5 s, or the largest single process's
peak RSS from ``resource.getrusage`` when that is higher (short-lived peaks between samples, no ``/proc``).
A stage that fails is reported in the table as ``failed: <reason>`` (full output in ``WORK/logs/``); the
later stages of that tool are not run.

Defaults (``--budget-minutes 45 --test-cases 20``) finish in about two hours on a 2-core CPU for the
200-case hippocampus data. Install nnU-Net v2 into its own environment first, e.g.::

    python3 -m venv /work/nnunet_venv && /work/nnunet_venv/bin/pip install nnunetv2

Note: the generated trainer file stays in the nnU-Net environment (it is needed again to predict with the
trained model, and is rewritten only when its text changes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = 988
TRAINER_NAME = "nnUNetTrainer_medsegBudget"
SPLIT_SEED = 12345
NNUNET_CONFIG = "3d_fullres"
KNOWN_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr")
GIB = 1024.0**3


class CompareError(Exception):
    """An expected problem with the inputs or options; reported as one message, exit status 2."""


# --------------------------------------------------------------------------------------------------------------
# Reading the source dataset (kept independent of medseg's reader)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceCase:
    """One labelled case of the source dataset: one image file per channel (or one 4D file) and a label."""

    case_id: str
    images: tuple[Path, ...]
    label: Path


@dataclass(frozen=True)
class SourceDataset:
    """A labelled dataset. ``labels`` maps class name -> id, background (id 0) included."""

    root: Path
    name: str
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    cases: tuple[SourceCase, ...]

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def case(self, case_id: str) -> SourceCase:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(case_id)


def _ending_of(name: str) -> str | None:
    low = name.lower()
    for ending in KNOWN_ENDINGS:
        if low.endswith(ending):
            return ending
    return None


def _strip_ending(name: str) -> str:
    ending = _ending_of(name)
    return name[: -len(ending)] if ending else name


def _parse_labels(meta: dict, path: Path) -> dict[str, int]:
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise CompareError(f"{path}: 'labels' must be a non-empty mapping")
    ids: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, str) and str(key).strip().lstrip("-").isdigit():  # MSD: "1": "Anterior"
            ident, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: "Anterior": 1
            ident, name = value, str(key)
        else:
            raise CompareError(
                f"{path}: label {key!r}: {value!r} is neither id->name nor name->id "
                "(region-based labels are not supported)"
            )
        if ident in ids:
            raise CompareError(f"{path}: label id {ident} is declared twice")
        ids[ident] = name
    if 0 not in ids:
        raise CompareError(f"{path}: 'labels' must declare the background id 0")
    ids[0] = "background"  # nnU-Net requires this name for id 0
    names = [ids[i] for i in sorted(ids)]
    if len(set(names)) != len(names):
        raise CompareError(f"{path}: label names must be unique, got {names}")
    return {ids[i]: i for i in sorted(ids)}


def _parse_channels(meta: dict) -> tuple[str, ...]:
    raw = meta.get("channel_names") or meta.get("modality") or {"0": "image"}
    if not isinstance(raw, dict):
        raise CompareError("dataset.json: 'channel_names'/'modality' must be a mapping")
    return tuple(str(raw[k]) for k in sorted(raw, key=lambda k: int(k)))


def read_source_dataset(root: str | Path) -> SourceDataset:
    """Read the case list of an MSD or nnU-Net v2 dataset folder; only labelled training cases are used.

    Raises:
        CompareError: missing folder or dataset.json, malformed labels, missing files, fewer than 2 cases.
    """
    root = Path(root).resolve()
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise CompareError(f"{root}: no dataset.json (expected an MSD or nnU-Net v2 dataset folder)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"{meta_path}: cannot read: {exc}") from None
    labels = _parse_labels(meta, meta_path)
    channels = _parse_channels(meta)
    cases: list[SourceCase] = []
    training = meta.get("training")
    if isinstance(training, list) and training:  # MSD
        for entry in training:
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise CompareError(f"{meta_path}: each 'training' entry needs 'image' and 'label'")
            image = (root / entry["image"]).resolve()
            label = (root / entry["label"]).resolve()
            cases.append(SourceCase(_strip_ending(image.name), (image,), label))
    else:  # nnU-Net v2 layout: imagesTr/CASE_0000<ending>
        ending = meta.get("file_ending")
        images_dir = root / "imagesTr"
        groups: dict[str, dict[int, Path]] = {}
        for f in sorted(images_dir.iterdir()) if images_dir.is_dir() else []:
            if f.name.startswith("."):
                continue
            fe = ending if ending and f.name.endswith(ending) else _ending_of(f.name)
            if fe is None:
                continue
            stem = f.name[: -len(fe)]
            m = re.fullmatch(r"(.+)_(\d{4})", stem)
            if m:
                groups.setdefault(m.group(1), {})[int(m.group(2))] = f
            else:
                groups.setdefault(stem, {})[0] = f
        for cid, chans in sorted(groups.items()):
            if sorted(chans) != list(range(len(channels))) and len(chans) != 1:
                raise CompareError(
                    f"{images_dir}: case {cid} has channel files {sorted(chans)}, expected 0..{len(channels) - 1}"
                )
            fe = _ending_of(chans[0].name) or ""
            cases.append(SourceCase(cid, tuple(chans[i] for i in sorted(chans)), root / "labelsTr" / f"{cid}{fe}"))
    missing = [str(p) for c in cases for p in (*c.images, c.label) if not p.is_file()]
    if missing:
        raise CompareError(f"{root}: {len(missing)} file(s) listed but missing, e.g. {missing[0]}")
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise CompareError(f"{root}: duplicate case ids")
    if len(cases) < 2:
        raise CompareError(f"{root}: found {len(cases)} labelled case(s); need at least 2")
    name = str(meta.get("name") or root.name)
    return SourceDataset(root, name, channels, labels, tuple(sorted(cases, key=lambda c: c.case_id)))


def split_cases(
    case_ids: list[str], num_test: int, seed: int = SPLIT_SEED, max_train: int | None = None, min_train: int = 5
) -> tuple[list[str], list[str]]:
    """Deterministic split into (training ids, test ids), both sorted.

    The ids are sorted, shuffled with ``random.Random(seed)``; the first ``num_test`` are the test cases,
    the rest (or its first ``max_train``) the training part. The result does not depend on the input order.

    Raises:
        CompareError: fewer than ``min_train`` training cases would remain (5-fold fold 0 needs 5).
    """
    if num_test < 1:
        raise CompareError(f"--test-cases must be >= 1, got {num_test}")
    ids = sorted(set(case_ids))
    random.Random(seed).shuffle(ids)
    test, train = ids[:num_test], ids[num_test:]
    if max_train is not None:
        train = train[:max_train]
    if len(train) < min_train:
        raise CompareError(
            f"{len(case_ids)} cases with {num_test} test case(s) leave {len(train)} for "
            f"training; need at least {min_train} (5-fold cross-validation, fold 0)"
        )
    return sorted(train), sorted(test)


def nnunet_label_ids(labels: dict[str, int]) -> dict[int, int]:
    """Map original label id -> consecutive id 0..K-1 (identity when already consecutive)."""
    return {orig: new for new, orig in enumerate(sorted(labels.values()))}


def _remap(arr: np.ndarray, lut: dict[int, int]) -> np.ndarray:
    mapped = np.zeros(arr.shape, dtype=np.uint8 if len(lut) <= 256 else np.uint16)
    for k, v in lut.items():
        mapped[arr == k] = v
    return mapped


def _copy_or_convert(src: Path, dst: Path, lut: dict[int, int] | None = None) -> None:
    """Copy ``src`` to ``dst`` (.nii.gz) byte for byte when possible.

    Label ids are remapped through ``lut`` when it is not the identity: NIfTI files with nibabel, reusing the
    source header unchanged (so origin, spacing and direction stay bit-identical); other formats are
    converted with SimpleITK.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    identity = lut is None or all(k == v for k, v in lut.items())
    name = src.name.lower()
    if identity and name.endswith(".nii.gz"):
        shutil.copyfile(src, dst)
        return
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(src))
        data = np.asanyarray(img.dataobj)
        header = img.header.copy()
        if not identity:
            data = _remap(data, lut)
            header.set_data_dtype(data.dtype)
            header.set_slope_inter(1.0, 0.0)
        nib.save(nib.Nifti1Image(data, None, header), str(dst))
        return
    import SimpleITK as sitk

    img = sitk.ReadImage(str(src))
    if not identity:
        out = sitk.GetImageFromArray(_remap(sitk.GetArrayFromImage(img), lut))
        out.CopyInformation(img)
        img = out
    sitk.WriteImage(img, str(dst), useCompression=True)


def _write_channels(case: SourceCase, num_channels: int, out_dir: Path) -> list[Path]:
    """Write ``CASE_0000.nii.gz`` ... into ``out_dir``; a single 4D file with several channels is split."""
    import SimpleITK as sitk

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if len(case.images) == 1 and num_channels > 1:
        img = sitk.ReadImage(str(case.images[0]))
        if img.GetDimension() != 4 or img.GetSize()[3] != num_channels:
            raise CompareError(f"{case.images[0]}: expected a 4D image with {num_channels} channels")
        size = list(img.GetSize())
        for c in range(num_channels):
            vol = sitk.Extract(img, size[:3] + [0], [0, 0, 0, c])
            dst = out_dir / f"{case.case_id}_{c:04d}.nii.gz"
            sitk.WriteImage(vol, str(dst), useCompression=True)
            written.append(dst)
        return written
    if len(case.images) != num_channels:
        raise CompareError(f"case {case.case_id}: {len(case.images)} image file(s) for {num_channels} channel(s)")
    for c, src in enumerate(case.images):
        dst = out_dir / f"{case.case_id}_{c:04d}.nii.gz"
        _copy_or_convert(src, dst)
        written.append(dst)
    return written


def _dataset_folder_name(dataset_id: int, name: str) -> str:
    clean = "".join(ch for ch in name if ch.isalnum()) or "Compare"
    return f"Dataset{dataset_id:03d}_{clean}"


def write_nnunet_raw(ds: SourceDataset, train_ids: list[str], raw_root: Path, dataset_id: int = DATASET_ID) -> Path:
    """Copy the training cases into an nnU-Net v2 raw dataset under ``raw_root``; returns its folder.

    Layout: ``imagesTr/CASE_XXXX.nii.gz`` per channel, ``labelsTr/CASE.nii.gz`` (ids renumbered to 0..K-1
    when the source has gaps), ``dataset.json`` with channel_names, labels (name -> id), numTraining and
    file_ending.
    """
    out = raw_root / _dataset_folder_name(dataset_id, ds.name)
    if out.exists():
        shutil.rmtree(out)
    lut = nnunet_label_ids(ds.labels)
    for cid in train_ids:
        case = ds.case(cid)
        _write_channels(case, len(ds.channel_names), out / "imagesTr")
        _copy_or_convert(case.label, out / "labelsTr" / f"{cid}.nii.gz", lut)
    meta = {
        "name": ds.name,
        "channel_names": {str(i): n for i, n in enumerate(ds.channel_names)},
        "labels": {n: lut[i] for n, i in sorted(ds.labels.items(), key=lambda kv: kv[1])},
        "numTraining": len(train_ids),
        "file_ending": ".nii.gz",
    }
    _atomic_write_text(out / "dataset.json", json.dumps(meta, indent=1))
    return out


def write_test_split(ds: SourceDataset, test_ids: list[str], images_dir: Path, reference_dir: Path) -> None:
    """Copy test images (``CASE_XXXX.nii.gz``) and their labels (``CASE.nii.gz``, renumbered like training)."""
    lut = nnunet_label_ids(ds.labels)
    for d in (images_dir, reference_dir):
        if d.exists():
            shutil.rmtree(d)
    for cid in test_ids:
        case = ds.case(cid)
        _write_channels(case, len(ds.channel_names), images_dir)
        _copy_or_convert(case.label, reference_dir / f"{cid}.nii.gz", lut)


# --------------------------------------------------------------------------------------------------------------
# Metrics (independent of medseg and nnU-Net)
# --------------------------------------------------------------------------------------------------------------


def dice_per_class(pred: np.ndarray, ref: np.ndarray, label_ids: list[int]) -> dict[int, float]:
    """Dice of each label id between two label maps of equal shape; NaN where both lack the class."""
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch {pred.shape} vs {ref.shape}")
    out: dict[int, float] = {}
    for lab in label_ids:
        p, r = pred == lab, ref == lab
        denom = int(p.sum()) + int(r.sum())
        out[lab] = float("nan") if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def hd95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: tuple[float, ...]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two binary masks.

    Args:
        pred_mask, ref_mask: boolean arrays of equal shape, axes in the order of ``spacing``.
        spacing: voxel size in mm per axis (e.g. (z, y, x) for SimpleITK arrays).

    Returns:
        max(P95 of distances pred-surface -> ref-surface, P95 of ref-surface -> pred-surface); NaN when both
        masks are empty; the image diagonal in mm when exactly one is empty.
    """
    from scipy import ndimage

    pred_mask, ref_mask = pred_mask.astype(bool), ref_mask.astype(bool)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"shape mismatch {pred_mask.shape} vs {ref_mask.shape}")
    has_p, has_r = bool(pred_mask.any()), bool(ref_mask.any())
    if not has_p and not has_r:
        return float("nan")
    if not has_p or not has_r:
        return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(pred_mask.shape, spacing))))
    sp, sr = _surface(pred_mask), _surface(ref_mask)
    dist_to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(max(np.percentile(dist_to_ref[sp], 95), np.percentile(dist_to_pred[sr], 95)))


def _nanmean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def evaluate_folder(pred_dir: Path, ref_dir: Path, case_ids: list[str], labels: dict[str, int]) -> dict:
    """Dice and HD95 per case and class for ``pred_dir/CASE.nii.gz`` against ``ref_dir/CASE.nii.gz``.

    ``labels`` maps class name -> id as written in the reference (background is skipped). A missing or
    unreadable prediction, or one on another grid, is scored as all-background and listed in ``problems``.
    """
    import SimpleITK as sitk

    fg = {n: i for n, i in labels.items() if i != 0}
    per_case: dict[str, dict] = {}
    problems: list[str] = []
    for cid in case_ids:
        ref_img = sitk.ReadImage(str(ref_dir / f"{cid}.nii.gz"))
        ref = sitk.GetArrayFromImage(ref_img)
        spacing = tuple(float(s) for s in reversed(ref_img.GetSpacing()))
        pred = None
        path = pred_dir / f"{cid}.nii.gz"
        if not path.is_file():
            candidates = sorted(p for p in pred_dir.glob(f"{cid}.*") if _ending_of(p.name)) if pred_dir.is_dir() else []
            path = candidates[0] if candidates else path
        if not path.is_file():
            problems.append(f"{cid}: no prediction")
        else:
            try:
                pred_img = sitk.ReadImage(str(path))
                pred = sitk.GetArrayFromImage(pred_img)
                if (
                    pred.shape != ref.shape
                    or not np.allclose(pred_img.GetSpacing(), ref_img.GetSpacing(), atol=1e-4)
                    or not np.allclose(pred_img.GetOrigin(), ref_img.GetOrigin(), atol=1e-3)
                    or not np.allclose(pred_img.GetDirection(), ref_img.GetDirection(), atol=1e-4)
                ):
                    problems.append(
                        f"{cid}: prediction grid differs from the reference (shape {pred.shape} vs {ref.shape})"
                    )
                    pred = None
            except RuntimeError as exc:
                problems.append(f"{cid}: unreadable prediction ({str(exc).strip().splitlines()[-1][:120]})")
                pred = None
        if pred is None:
            pred = np.zeros_like(ref)
        dice = dice_per_class(pred, ref, list(fg.values()))
        per_case[cid] = {
            "dice": {n: dice[i] for n, i in fg.items()},
            "hd95_mm": {n: hd95(pred == i, ref == i, spacing) for n, i in fg.items()},
        }
    dice_mean = {n: _nanmean([per_case[c]["dice"][n] for c in case_ids]) for n in fg}
    hd_mean = {n: _nanmean([per_case[c]["hd95_mm"][n] for c in case_ids]) for n in fg}
    return {
        "num_cases": len(case_ids),
        "num_problems": len(problems),
        "problems": problems,
        "dice": dice_mean,
        "mean_dice": _nanmean([per_case[c]["dice"][n] for c in case_ids for n in fg]),
        "hd95_mm": hd_mean,
        "mean_hd95_mm": _nanmean([per_case[c]["hd95_mm"][n] for c in case_ids for n in fg]),
        "per_case": per_case,
    }


# --------------------------------------------------------------------------------------------------------------
# Running a stage: wall time and peak memory of the whole process tree
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    """Outcome of one command. ``reason`` is set when ``ok`` is False (``failed: ...`` or ``not run ...``)."""

    name: str
    ok: bool
    seconds: float | None = None
    peak_ram_bytes: int | None = None
    peak_ram_method: str | None = None
    returncode: int | None = None
    reason: str | None = None
    command: str | None = None
    log: str | None = None


def _proc_children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _proc_memory(pid: int) -> int:
    """PSS of one process in bytes (RSS when smaps_rollup is unavailable); 0 when it is gone."""
    for path, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0


class TreeMemorySampler(threading.Thread):
    """Samples the summed memory of a process and all its descendants until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        children = _proc_children_map()
        todo, total = [self.pid], 0
        while todo:
            pid = todo.pop()
            total += _proc_memory(pid)
            todo.extend(children.get(pid, []))
        self.peak = max(self.peak, total)

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.sample()
            except OSError:
                pass
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # prefer the last line that looks like an error message over progress bars and warnings
    for ln in reversed(lines[-40:]):
        if re.search(r"(error|exception|failed|traceback|killed)", ln, re.IGNORECASE) and not ln.startswith("File "):
            return ln[:200]
    return lines[-1][:200] if lines else "no output"


def run_stage(
    name: str,
    cmd: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    cwd: Path | None = None,
) -> StageResult:
    """Run ``cmd``, logging its output to ``log_path``; never raises for a failing command."""
    import resource

    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd_text = " ".join(cmd)
    use_proc = Path("/proc/self/stat").exists()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            log.write(f"$ {cmd_text}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
            sampler = TreeMemorySampler(proc.pid) if use_proc else None
            if sampler:
                sampler.start()
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
            except KeyboardInterrupt:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                raise
            finally:
                if sampler:
                    sampler.stop()
    except OSError as exc:
        return StageResult(
            name, False, reason=f"failed: cannot start {cmd[0]}: {exc}", command=cmd_text, log=str(log_path)
        )
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is a running maximum over every child so far: it names this stage's largest
    # single process only when it grew during the stage
    largest_child = after * 1024 if after > before else 0
    tree = sampler.peak if sampler else 0
    peak = max(tree, largest_child) or None
    method = (
        ("process-tree PSS sampled every 0.5 s" if tree >= largest_child else "largest single process RSS (getrusage)")
        if peak
        else None
    )
    result = StageResult(name, rc == 0 and not timed_out, seconds, peak, method, rc, None, cmd_text, str(log_path))
    if timed_out:
        result.reason = f"failed: timed out after {timeout_s / 60:.0f} min"
    elif rc != 0:
        result.reason = f"failed: exit {rc}: {_last_line(log_path.read_text(errors='replace'))}"
    return result


def not_run(name: str, why: str) -> StageResult:
    return StageResult(name, False, reason=f"not run ({why})")


# --------------------------------------------------------------------------------------------------------------
# nnU-Net
# --------------------------------------------------------------------------------------------------------------

TRAINER_TEMPLATE = '''"""Generated by medseg's scripts/compare_nnunet.py; safe to delete.

nnU-Net's default trainer, unchanged except that training stops once a wall-clock budget is spent
(environment variable MEDSEG_COMPARE_BUDGET_SECONDS) and the final cross-validation is skipped.
With MEDSEG_COMPARE_SCHEDULE=budget the learning rate is annealed over the elapsed fraction of the budget.
"""

import os
import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {name}(nnUNetTrainer):
    def run_training(self):
        budget = float(os.environ.get("MEDSEG_COMPARE_BUDGET_SECONDS", "0"))
        anneal = os.environ.get("MEDSEG_COMPARE_SCHEDULE", "default") == "budget" and budget > 0
        self.on_train_start()
        start = time.perf_counter()
        iterations, epochs, out_of_time = 0, 0, False
        while self.current_epoch < self.num_epochs and not out_of_time:
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            for _ in range(self.num_iterations_per_epoch):
                if anneal:
                    fraction = min((time.perf_counter() - start) / budget, 1.0)
                    for group in self.optimizer.param_groups:
                        group["lr"] = self.initial_lr * (1.0 - fraction) ** 0.9
                outputs.append(self.train_step(next(self.dataloader_train)))
                iterations += 1
                if budget > 0 and time.perf_counter() - start >= budget:
                    out_of_time = True
                    break
            self.on_train_epoch_end(outputs)
            if out_of_time:
                break
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
            epochs += 1
            out_of_time = budget > 0 and time.perf_counter() - start >= budget
        seconds = time.perf_counter() - start
        self.print_to_log_file(
            f"medseg-budget: iterations_done={{iterations}} train_seconds={{seconds:.2f}} "
            f"epochs_completed={{epochs}} budget_seconds={{budget:.0f}} schedule={{'budget' if anneal else 'default'}}",
            also_print_to_console=True)
        self.on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("medseg-budget: final cross-validation skipped", also_print_to_console=True)
'''


def trainer_source() -> str:
    """Text of the generated nnU-Net trainer module."""
    return TRAINER_TEMPLATE.format(name=TRAINER_NAME)


def install_trainer(nnunet_python: Path) -> Path:
    """Write the budget trainer into the nnU-Net package of ``nnunet_python``; returns the file written."""
    proc = subprocess.run(
        [str(nnunet_python), "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cannot import nnunetv2 with {nnunet_python}: {_last_line(proc.stderr)}")
    folder = Path(proc.stdout.strip()) / "training" / "nnUNetTrainer" / "variants" / "medseg_compare"
    target = folder / f"{TRAINER_NAME}.py"
    text = trainer_source()
    if target.is_file() and target.read_text() == text:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    init = folder / "__init__.py"
    if not init.exists():
        init.write_text("")
    _atomic_write_text(target, text)
    return target


def parse_nnunet_log(fold_dir: Path) -> dict:
    """Iterations done and training-loop seconds from the budget trainer's line in nnU-Net's training log."""
    found: dict = {}
    for log in sorted(fold_dir.glob("training_log_*.txt")):
        for m in re.finditer(
            r"medseg-budget: iterations_done=(\d+) train_seconds=([\d.]+) epochs_completed=(\d+)",
            log.read_text(errors="replace"),
        ):
            found = {
                "iterations": int(m.group(1)),
                "train_loop_seconds": float(m.group(2)),
                "epochs_completed": int(m.group(3)),
            }
    return found


def run_nnunet(args: argparse.Namespace, raw_dataset: Path, work: Path, test_images: Path) -> dict:
    """Plan+preprocess, train for the budget and predict with nnU-Net v2; every stage is recorded."""
    bin_dir = Path(args.nnunet_bin_dir)
    tool: dict[str, Any] = {"stages": {}}
    stages = tool["stages"]
    env = dict(os.environ)
    if (work / "nnunet").exists():
        shutil.rmtree(work / "nnunet")
    roots = {v: work / "nnunet" / v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for v, p in roots.items():
        p.mkdir(parents=True, exist_ok=True)
        env[v] = str(p)
    env["nnUNet_n_proc_DA"] = str(args.num_workers)
    env["MEDSEG_COMPARE_BUDGET_SECONDS"] = str(args.budget_minutes * 60.0)
    env["MEDSEG_COMPARE_SCHEDULE"] = args.nnunet_schedule
    env.pop("PYTHONPATH", None)
    link = roots["nnUNet_raw"] / raw_dataset.name
    if not link.exists():
        link.symlink_to(raw_dataset.resolve(), target_is_directory=True)
    logs = work / "logs"
    dev = args.device

    exe = {n: bin_dir / n for n in ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict")}
    missing = [str(p) for p in exe.values() if not p.is_file()]
    if missing:
        reason = f"failed: nnU-Net v2 not found ({missing[0]})"
        for s in ("plan", "train", "predict"):
            stages[s] = StageResult(s, False, reason=reason)
        return tool
    try:
        tool["trainer_file"] = str(install_trainer(bin_dir / "python"))
    except (RuntimeError, OSError) as exc:
        stages["plan"] = StageResult("plan", False, reason=f"failed: {exc}")
    w = str(args.num_workers)
    if "plan" not in stages:
        stages["plan"] = run_stage(
            "plan",
            [
                str(exe["nnUNetv2_plan_and_preprocess"]),
                "-d",
                str(DATASET_ID),
                "-c",
                NNUNET_CONFIG,
                "--verify_dataset_integrity",
                "-npfp",
                w,
                "-np",
                w,
            ],
            logs / "nnunet_plan.log",
            env,
            timeout_s=args.stage_timeout_minutes * 60,
        )
    if stages["plan"].ok:
        try:
            plans = json.loads((roots["nnUNet_preprocessed"] / raw_dataset.name / "nnUNetPlans.json").read_text())
            c = plans["configurations"][NNUNET_CONFIG]
            tool["batch_patch"] = f"{c['batch_size']} x {c['patch_size']}"
        except (OSError, KeyError, json.JSONDecodeError):
            pass
        stages["train"] = run_stage(
            "train",
            [str(exe["nnUNetv2_train"]), str(DATASET_ID), NNUNET_CONFIG, "0", "-tr", TRAINER_NAME, "-device", dev],
            logs / "nnunet_train.log",
            env,
            timeout_s=args.budget_minutes * 60 + args.stage_timeout_minutes * 60,
        )
        trained = f"{TRAINER_NAME}__nnUNetPlans__{NNUNET_CONFIG}"
        fold_dir = roots["nnUNet_results"] / raw_dataset.name / trained / "fold_0"
        tool.update(parse_nnunet_log(fold_dir))
    else:
        stages["train"] = not_run("train", "plan failed")
    if stages["train"].ok:
        pred = work / "predictions" / "nnunet"
        if pred.exists():
            shutil.rmtree(pred)
        stages["predict"] = run_stage(
            "predict",
            [
                str(exe["nnUNetv2_predict"]),
                "-i",
                str(test_images),
                "-o",
                str(pred),
                "-d",
                str(DATASET_ID),
                "-c",
                NNUNET_CONFIG,
                "-f",
                "0",
                "-tr",
                TRAINER_NAME,
                "-chk",
                "checkpoint_final.pth",
                "-device",
                dev,
                "-npp",
                w,
                "-nps",
                w,
            ],
            logs / "nnunet_predict.log",
            env,
            timeout_s=args.stage_timeout_minutes * 60,
        )
        tool["predictions"] = str(pred)
    else:
        stages["predict"] = not_run("predict", "training failed")
    return tool


# --------------------------------------------------------------------------------------------------------------
# medseg
# --------------------------------------------------------------------------------------------------------------

_ITER_KEYS = ("iterations_done", "iterations", "iteration", "num_iterations", "total_iterations", "global_step")
_SECONDS_KEYS = ("train_seconds", "elapsed_seconds", "elapsed", "training_seconds", "wall_seconds")


def _find_number(obj: Any, keys: tuple[str, ...]) -> float | None:
    """First numeric value under one of ``keys`` (in key order), searching dicts and the last list item."""
    if isinstance(obj, list):
        for item in reversed(obj):
            v = _find_number(item, keys)
            if v is not None:
                return v
        return None
    if not isinstance(obj, dict):
        return None
    for k in keys:
        v = obj.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    for v in obj.values():
        if isinstance(v, (dict, list)):
            found = _find_number(v, keys)
            if found is not None:
                return found
    return None


def parse_medseg_run(work: Path, fold: int = 0) -> dict:
    """Iterations done, training-loop seconds, configuration and batch x patch of medseg's fold run."""
    from medseg.io.workdir import WorkDir

    wd = WorkDir(work)
    runs = sorted(
        (r for r in (wd.run(c, a, fold) for c, a in wd.run_pairs()) if r.path.is_dir()),
        key=lambda r: r.path.stat().st_mtime,
    )
    if not runs:
        return {}
    run = runs[-1]
    out: dict[str, Any] = {"run_dir": str(run.path), "configuration": run.configuration}
    for path in (run.progress, run.config):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "iterations" not in out:
            it = _find_number(data, _ITER_KEYS)
            if it is not None:
                out["iterations"] = int(it)
        if "train_loop_seconds" not in out:
            sec = _find_number(data, _SECONDS_KEYS)
            if sec is not None:
                out["train_loop_seconds"] = float(sec)
    log = run.training_log
    if "iterations" not in out and log.is_file():
        hits = re.findall(r"iteration[s]?\D{0,3}(\d+)", log.read_text(errors="replace"), re.IGNORECASE)
        if hits:
            out["iterations"] = int(hits[-1])
    for plan_path in (run.plans, wd.plans):
        try:
            plan = json.loads(plan_path.read_text())
            c = plan["configurations"][out["configuration"]]
            out["batch_patch"] = f"{c['batch_size']} x {c['patch_size']}"
            break
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            continue
    return out


def _medseg_batch_patch(work: Path) -> str | None:
    try:
        from medseg.io.workdir import WorkDir

        plan = json.loads(WorkDir(work).plans.read_text())
        c = plan["configurations"][plan["default_configuration"]]
        return f"{c['batch_size']} x {c['patch_size']}"
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def run_medseg(args: argparse.Namespace, raw_dataset: Path, work: Path, test_images: Path) -> dict:
    """``medseg plan`` / ``train`` / ``predict`` on the same data, device and budget; every stage recorded."""
    tool: dict[str, Any] = {"stages": {}}
    stages = tool["stages"]
    exe = args.medseg_bin
    mwork = work / "medseg"
    logs = work / "logs"
    dev, w, m = args.device, str(args.num_workers), f"{args.budget_minutes:g}"
    env = dict(os.environ)
    if mwork.exists():
        shutil.rmtree(mwork)
    stages["plan"] = run_stage(
        "plan",
        [exe, "plan", str(raw_dataset), "-o", str(mwork), "--device", dev, "--time-budget", m, "--num-workers", w],
        logs / "medseg_plan.log",
        env,
        timeout_s=args.stage_timeout_minutes * 60,
    )
    if stages["plan"].ok:
        tool["batch_patch"] = _medseg_batch_patch(mwork)
        stages["train"] = run_stage(
            "train",
            [exe, "train", str(mwork), "--fold", "0", "--time-budget", m, "--device", dev, "--no-validation"],
            logs / "medseg_train.log",
            env,
            timeout_s=args.budget_minutes * 60 + args.stage_timeout_minutes * 60,
        )
        run_info = parse_medseg_run(mwork)
        if run_info.get("batch_patch"):
            tool["batch_patch"] = run_info.pop("batch_patch")
        tool.update(run_info)
    else:
        stages["train"] = not_run("train", "plan failed")
    if stages["train"].ok:
        pred = work / "predictions" / "medseg"
        if pred.exists():
            shutil.rmtree(pred)
        stages["predict"] = run_stage(
            "predict",
            [
                exe,
                "predict",
                "-i",
                str(test_images),
                "-o",
                str(pred),
                "-m",
                str(mwork),
                "--folds",
                "0",
                "--device",
                dev,
                "--num-workers",
                w,
            ],
            logs / "medseg_predict.log",
            env,
            timeout_s=args.stage_timeout_minutes * 60,
        )
        tool["predictions"] = str(pred)
    else:
        stages["predict"] = not_run("predict", "training failed")
    return tool


# --------------------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table row: values are numbers, strings (e.g. ``failed: ...``) or None (n/a)."""

    metric: str
    nnunet: Any
    medseg: Any
    ratio: float | None = None
    fmt: str = "{:.2f}"


def _cell(tool: dict | None, needs: tuple[str, ...], get: Callable[[dict], Any], detail: bool = False) -> Any:
    """A row's value for one tool; the first stage it needs that did not succeed replaces it.

    With ``detail`` (the row timing that very stage) the full ``failed: <reason>`` is shown, elsewhere
    ``failed (<stage>)`` or ``not run``, so that a reason appears once per column.
    """
    if tool is None:
        return "skipped"
    for name in needs:
        stage = tool["stages"].get(name)
        if stage is None:
            return "not run"
        if not stage.ok:
            if stage.reason and stage.reason.startswith("not run"):
                return "not run"
            return stage.reason if detail and name == needs[-1] else f"failed ({name})"
    try:
        return get(tool)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def _ratio(a: Any, b: Any) -> float | None:
    """medseg / nnU-Net when both are finite numbers and nnU-Net's is non-zero."""
    num = (int, float)
    if (
        isinstance(a, num)
        and isinstance(b, num)
        and not isinstance(a, bool)
        and math.isfinite(a)
        and math.isfinite(b)
        and a != 0
    ):
        return float(b) / float(a)
    return None


def _throughput(tool: dict) -> float | None:
    it = tool.get("iterations")
    sec = tool.get("train_loop_seconds") or tool["stages"]["train"].seconds
    return it / sec if it is not None and sec else None


def build_rows(nnunet: dict | None, medseg: dict | None, labels: dict[str, int], num_test: int) -> list[Row]:
    """The comparison table's rows from two tool results (either may be None = skipped)."""

    def gib(stage: str) -> Callable[[dict], float | None]:
        def get(t: dict) -> float | None:
            peak = t["stages"][stage].peak_ram_bytes
            return peak / GIB if peak else None

        return get

    detailed = {"plan + preprocess time (s)", "training wall time (s)", f"prediction time, {num_test} cases, TTA (s)"}
    specs: list[tuple[str, tuple[str, ...], Callable[[dict], Any], str]] = [
        ("plan + preprocess time (s)", ("plan",), lambda t: t["stages"]["plan"].seconds, "{:.1f}"),
        ("training wall time (s)", ("plan", "train"), lambda t: t["stages"]["train"].seconds, "{:.1f}"),
        ("training iterations done", ("plan", "train"), lambda t: t.get("iterations"), "{:d}"),
        ("training throughput (it/s)", ("plan", "train"), _throughput, "{:.3f}"),
        ("batch x patch", ("plan",), lambda t: t.get("batch_patch"), "{}"),
        (
            f"prediction time, {num_test} cases, TTA (s)",
            ("plan", "train", "predict"),
            lambda t: t["stages"]["predict"].seconds,
            "{:.1f}",
        ),
        ("peak RAM plan + preprocess (GiB)", ("plan",), gib("plan"), "{:.2f}"),
        ("peak RAM training (GiB)", ("plan", "train"), gib("train"), "{:.2f}"),
        ("peak RAM prediction (GiB)", ("plan", "train", "predict"), gib("predict"), "{:.2f}"),
    ]
    full = ("plan", "train", "predict")
    for name, ident in sorted(labels.items(), key=lambda kv: kv[1]):
        if ident != 0:
            specs.append((f"Dice {name}", full, lambda t, n=name: t["metrics"]["dice"][n], "{:.4f}"))
    specs += [
        ("mean Dice", full, lambda t: t["metrics"]["mean_dice"], "{:.4f}"),
        ("mean HD95 (mm)", full, lambda t: t["metrics"]["mean_hd95_mm"], "{:.2f}"),
        ("test cases without a usable prediction", full, lambda t: t["metrics"]["num_problems"], "{:d}"),
    ]
    rows = []
    for metric, needs, get, fmt in specs:
        detail = metric in detailed
        a, b = _cell(nnunet, needs, get, detail), _cell(medseg, needs, get, detail)
        rows.append(Row(metric, a, b, _ratio(a, b), fmt))
    return rows


def format_value(value: Any, fmt: str = "{:.2f}") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def render_markdown(rows: list[Row]) -> str:
    """A GitHub Markdown table: metric | nnU-Net | medseg | ratio (medseg / nnU-Net)."""
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| metric | nnU-Net | medseg | ratio (medseg / nnU-Net) |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {esc(r.metric)} | {esc(format_value(r.nnunet, r.fmt))} | {esc(format_value(r.medseg, r.fmt))} "
            f"| {format_value(r.ratio, '{:.2f}')} |"
        )
    return "\n".join(lines) + "\n"


def render_text(rows: list[Row], width: int = 34) -> str:
    """A fixed-width text table for the terminal (long failure reasons are shortened)."""

    def cut(s: str, n: int) -> str:
        return s if len(s) <= n else s[: n - 1] + "~"

    header = f"{'metric':<42} {'nnU-Net':>{width}} {'medseg':>{width}} {'ratio':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{cut(r.metric, 42):<42} {cut(format_value(r.nnunet, r.fmt), width):>{width}} "
            f"{cut(format_value(r.medseg, r.fmt), width):>{width}} {format_value(r.ratio, '{:.2f}'):>8}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def machine_description(device: str) -> dict:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    if device == "cuda" and shutil.which("nvidia-smi"):
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["gpu"] = proc.stdout.strip() or None
    return info


def _versions(args: argparse.Namespace) -> dict:
    out: dict[str, str | None] = {}
    try:
        from importlib.metadata import version

        out["medseg"] = version("medseg")
    except Exception:  # noqa: BLE001 - informational only
        out["medseg"] = None
    py = Path(args.nnunet_bin_dir) / "python"
    if py.is_file():
        proc = subprocess.run(
            [str(py), "-c", "from importlib.metadata import version as v; print(v('nnunetv2'), v('torch'))"],
            capture_output=True,
            text=True,
            check=False,
        )
        parts = proc.stdout.split()
        if proc.returncode == 0 and len(parts) == 2:
            out["nnunetv2"], out["nnunet_torch"] = parts
    return out


def _default_medseg_bin() -> str:
    sibling = Path(sys.executable).parent / "medseg"
    return str(sibling) if sibling.is_file() else (shutil.which("medseg") or "medseg")


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("data", type=Path, help="dataset folder (MSD or nnU-Net v2 layout); only read")
    p.add_argument("--budget-minutes", type=float, default=45.0, help="training wall-clock budget for each tool")
    p.add_argument("--test-cases", type=int, default=20, help="held-out test cases")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--workdir", type=Path, default=None, help="work folder (kept); default: a temporary folder removed at the end"
    )
    p.add_argument("--nnunet-bin-dir", default="/work/nnunet_venv/bin", help="folder with nnUNetv2_* and python")
    p.add_argument("--medseg-bin", default=_default_medseg_bin(), help="medseg console script")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for compare_nnunet.json/.md")
    p.add_argument(
        "--num-workers",
        type=int,
        default=os.cpu_count() or 2,
        help="worker processes for both tools' preprocessing and export, and nnU-Net's data loading "
        "(nnUNet_n_proc_DA); medseg's trainer picks its own data workers (none on 2 cores)",
    )
    p.add_argument("--max-train-cases", type=int, default=None, help="use only this many training cases (smoke runs)")
    p.add_argument("--seed", type=int, default=SPLIT_SEED, help="seed of the train/test split")
    p.add_argument(
        "--nnunet-schedule",
        choices=("default", "budget"),
        default="default",
        help="nnU-Net learning rate: its own poly schedule over 1000 epochs, or annealed over the budget",
    )
    p.add_argument(
        "--stage-timeout-minutes",
        type=float,
        default=60.0,
        help="limit for plan and predict, and the grace beyond the budget for training",
    )
    p.add_argument("--skip-nnunet", action="store_true")
    p.add_argument("--skip-medseg", action="store_true")
    args = p.parse_args(argv)
    if args.budget_minutes <= 0:
        p.error("--budget-minutes must be > 0")
    if args.num_workers < 1:
        p.error("--num-workers must be >= 1")
    if args.max_train_cases is not None and args.max_train_cases < 1:
        p.error("--max-train-cases must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ds = read_source_dataset(args.data)
        train_ids, test_ids = split_cases(ds.case_ids, args.test_cases, args.seed, args.max_train_cases)
        for what, path in (("--workdir", args.workdir), ("--out", args.out)):
            if path is not None and _is_inside(path, ds.root):
                raise CompareError(f"{what} {path} is inside the dataset folder {ds.root}; choose another place")
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    keep = args.workdir is not None
    work = args.workdir.resolve() if keep else Path(tempfile.mkdtemp(prefix="compare_nnunet_"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"compare_nnunet: {ds.name}: {len(train_ids)} training + {len(test_ids)} test cases, budget "
        f"{args.budget_minutes:g} min, device {args.device}, work folder {work}",
        flush=True,
    )
    try:
        t = time.perf_counter()
        raw = write_nnunet_raw(ds, train_ids, work / "data", DATASET_ID)
        test_images, reference = work / "test_images", work / "reference"
        write_test_split(ds, test_ids, test_images, reference)
        labels = {n: nnunet_label_ids(ds.labels)[i] for n, i in ds.labels.items()}
        print(f"  copied the split in {time.perf_counter() - t:.1f} s", flush=True)

        results: dict[str, dict | None] = {"nnunet": None, "medseg": None}
        for key, skip, runner in (("nnunet", args.skip_nnunet, run_nnunet), ("medseg", args.skip_medseg, run_medseg)):
            if skip:
                continue
            print(f"  running {key} ...", flush=True)
            tool = runner(args, raw, work, test_images)
            if tool["stages"].get("predict") is not None and tool["stages"]["predict"].ok:
                tool["metrics"] = evaluate_folder(Path(tool["predictions"]), reference, test_ids, labels)
            for s in tool["stages"].values():
                if s is not None:
                    status = f"{s.seconds:.1f} s" if s.ok else s.reason
                    print(f"    {key} {s.name}: {status}", flush=True)
            results[key] = tool

        rows = build_rows(results["nnunet"], results["medseg"], labels, len(test_ids))
        text = render_text(rows)
        command = "python scripts/compare_nnunet.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        machine = machine_description(args.device)
        md = (
            f"# medseg vs nnU-Net v2: {ds.name}\n\n"
            f"Command: `{command}`\n\n"
            f"Machine: {machine.get('cpu', '?')}, {machine.get('cpu_affinity', machine['cpu_count'])} cores, "
            f"{machine.get('ram_gib', '?')} GiB RAM, device {args.device}"
            f"{', GPU ' + machine['gpu'] if machine.get('gpu') else ''}\n\n"
            f"Split: {len(train_ids)} training cases (fold 0 of 5 trains on ~80% of them), {len(test_ids)} test "
            f"cases (seed {args.seed}); training budget {args.budget_minutes:g} min per tool; nnU-Net schedule "
            f"`{args.nnunet_schedule}`.\n\n" + render_markdown(rows)
        )
        report = {
            "command": command,
            "machine": machine,
            "versions": _versions(args),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "dataset": {"root": str(ds.root), "name": ds.name, "labels": labels},
            "split": {"seed": args.seed, "train": train_ids, "test": test_ids},
            "rows": [asdict(r) for r in rows],
            "tools": {k: _jsonable(v) for k, v in results.items()},
        }
        args.out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(args.out / "compare_nnunet.json", json.dumps(report, indent=1, default=str))
        _atomic_write_text(args.out / "compare_nnunet.md", md)
        print()
        print(text)
        print(
            f"\nwrote {args.out / 'compare_nnunet.json'} and {args.out / 'compare_nnunet.md'}"
            + (f"; work folder kept: {work}" if keep else "")
        )
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, StageResult):
        return asdict(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


if __name__ == "__main__":
    sys.exit(main())
