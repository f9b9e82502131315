"""Evaluate a folder of predicted segmentations against a folder of reference segmentations.

Cases are matched by file name without the image suffix (``case.nii.gz`` <-> ``case.nii.gz`` or
``case.nrrd``); instance maps beside the segmentations (``CASE_instances.nii.gz``) are not cases. Every
prediction needs a reference; references without a prediction are reported as ``missing_predictions`` (a
warning, not an error). Prediction and reference must have the same shape, spacing, origin and direction
(within 1e-3); every mismatch is reported at once, naming the case. Metric conventions (empty masks,
undefined HD95) are those of :mod:`medseg.evaluation.metrics`.

Ignore label (partial annotation): reference voxels holding the ignore id are left out of prediction
and reference alike (both are set to background there before any metric), so Dice and IoU count only
annotated voxels; surface metrics see the annotated region only. The ignore id is given explicitly or
read from the ``dataset.json`` of a dataset used as reference (``DATA`` or ``DATA/labelsTr``).

Lesion-wise evaluation (``lesion_wise`` options given): every case, label (or region) and mean gets a
``"lesion_wise"`` object with the keys of :data:`medseg.evaluation.lesion_wise.LESION_KEYS` (definitions,
matching and empty-case conventions in :mod:`medseg.evaluation.lesion_wise`); in the means tp, fp and fn
are summed over cases, the other keys averaged over cases.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import DatasetError, MedsegError
from medseg.evaluation.lesion_wise import (
    LESION_KEYS,
    LesionWiseOptions,
    csv_number,
    lesion_summary,
    lesion_wise_scores,
    mean_lesion_wise,
)
from medseg.evaluation.metrics import case_metrics
from medseg.io.dataset import load_dataset
from medseg.io.image import (
    INSTANCE_MAP_TAIL,
    ImageGeometry,
    atomic_write_text,
    has_image_suffix,
    read_image,
    read_sitk,
    strip_suffix,
)
from medseg.io.parallel import map_cases
from medseg.preprocessing.regions import region_key

logger = logging.getLogger(__name__)

METRICS = ("dice", "iou", "hd95", "surface_dice")
EMPTY_EMPTY = {
    "dice": 1.0,
    "iou": 1.0,
    "hd95": 0.0,
    "hd95_undefined": False,
    "surface_dice": 1.0,
    "n_pred": 0,
    "n_ref": 0,
}


class EvaluationReport(dict):
    """The JSON-ready result of :func:`evaluate_folders` (a plain ``dict``) with a :meth:`summary` line."""

    def summary(self) -> str:
        """One line: mean foreground Dice, per-label Dice, HD95, surface Dice."""
        return summary_line(self)


def _list_images(folder: Path) -> dict[str, Path]:
    names = (p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith("."))
    return {strip_suffix(p.name): p for p in names if has_image_suffix(p.name)}


def _header_geometry(path: Path) -> ImageGeometry:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ImageGeometry.from_sitk(read_sitk(path))  # raises a MedsegError naming the file
    return ImageGeometry.from_sitk(reader)


def _evaluate_case(
    args: tuple[
        str,
        Path,
        Path,
        tuple[int, ...] | None,
        float,
        int | None,
        tuple[tuple[int, ...], ...],
        LesionWiseOptions | None,
    ],
) -> dict[str, Any]:
    case_id, pred_path, ref_path, label_ids, tolerance, ignore_label, regions, lesion_opts = args
    pred, geo = read_image(pred_path)
    ref, _ = read_image(ref_path)
    for name, arr in (("prediction", pred), ("reference", ref)):
        if not np.issubdtype(arr.dtype, np.integer) and not np.all(np.mod(arr, 1) == 0):
            raise MedsegError(
                f"case {case_id}: {name} {pred_path if name == 'prediction' else ref_path} "
                "has non-integer values; is it a segmentation?"
            )
    pred = pred.astype(np.int64, copy=False)
    ref = ref.astype(np.int64, copy=False)
    ignored = 0
    if ignore_label is not None:
        mask = ref == ignore_label
        ignored = int(np.count_nonzero(mask))
        if ignored:
            pred, ref = np.where(mask, 0, pred), np.where(mask, 0, ref)
    labels = label_ids
    if labels is None:
        labels = tuple(int(v) for v in np.union1d(np.unique(pred), np.unique(ref)) if v != 0)
    elif ignore_label is not None:
        labels = tuple(v for v in labels if v != ignore_label)
    per_label: dict[Any, dict[str, Any]]
    if regions:  # region plans: metrics of each region's mask (voxels whose id is in the region)
        per_label = {
            region_key(r): case_metrics(
                np.isin(pred, r).astype(np.uint8), np.isin(ref, r).astype(np.uint8), geo.spacing, (1,), tolerance
            )[1]
            for r in regions
        }
    else:
        per_label = case_metrics(pred, ref, geo.spacing, labels, tolerance)
    if lesion_opts is not None:
        masks: dict[Any, tuple[np.ndarray, np.ndarray]] = {
            region_key(r): (np.isin(pred, r), np.isin(ref, r)) for r in regions
        } or {lab: (pred == lab, ref == lab) for lab in labels}
        for key, (p_mask, r_mask) in masks.items():
            per_label[key]["lesion_wise"] = lesion_wise_scores(p_mask, r_mask, geo.spacing, lesion_opts).to_dict()
    out: dict[str, Any] = {
        "case": case_id,
        "prediction": str(pred_path),
        "reference": str(ref_path),
        "labels": {str(k): v for k, v in per_label.items()},
    }
    if ignore_label is not None:
        out["ignored_voxels"] = ignored
    return out


def _dataset_ignore_label(ref_dir: Path) -> int | None:
    """The ignore label declared by the ``dataset.json`` of ``ref_dir`` (a dataset root) or of its parent
    (``ref_dir`` = ``DATA/labelsTr``); None when there is none or no readable dataset.json."""
    for root in (ref_dir, ref_dir.parent):
        if (root / "dataset.json").is_file():
            try:
                return load_dataset(root).ignore_label
            except MedsegError:
                return None
    return None


def _dataset_regions(ref_dir: Path) -> tuple[tuple[int, ...], ...]:
    """The regions declared by the ``dataset.json`` of ``ref_dir`` or its parent (see
    :func:`_dataset_ignore_label`); empty for ordinary labels or without a readable dataset.json."""
    for root in (ref_dir, ref_dir.parent):
        if (root / "dataset.json").is_file():
            try:
                return load_dataset(root).regions
            except MedsegError:
                return ()
    return ()


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def _aggregate(cases: list[dict], labels: list[int]) -> dict[str, dict]:
    mean: dict[str, dict] = {}
    for lab in labels:
        entries = [c["labels"][str(lab)] for c in cases]
        stats: dict[str, Any] = {}
        for m in METRICS:
            values = [e[m] for e in entries if e[m] is not None and math.isfinite(e[m])]
            stats[m] = float(np.mean(values)) if values else None
            stats[f"{m}_std"] = float(np.std(values)) if values else None
        stats["hd95_undefined_cases"] = sum(bool(e["hd95_undefined"]) for e in entries)
        stats["num_cases"] = len(entries)
        if entries and "lesion_wise" in entries[0]:
            stats["lesion_wise"] = mean_lesion_wise([e["lesion_wise"] for e in entries])
        mean[str(lab)] = stats
    return mean


def summary_line(result: dict) -> str:
    """One-line human summary of an :func:`evaluate_folders` result."""
    fg = result["foreground_mean"]
    per = ", ".join(f"{lab}: {v['dice']:.4f}" for lab, v in result["mean"].items() if v["dice"] is not None)
    hd = f"{fg['hd95']:.2f} mm" if fg.get("hd95") is not None else "n/a"
    nsd = f"{fg['surface_dice']:.4f}" if fg.get("surface_dice") is not None else "n/a"
    dice = f"{fg['dice']:.4f}" if fg.get("dice") is not None else "n/a"
    line = (
        f"{result['num_cases']} cases: mean foreground Dice {dice} (per label {per}); HD95 {hd}; "
        f"surface Dice@{result['tolerance_mm']:g}mm {nsd}"
    )
    undefined = sum(v["hd95_undefined_cases"] for v in result["mean"].values())
    if undefined:
        line += f"; HD95 undefined (one side empty) in {undefined} case-labels"
    if result.get("missing_predictions"):
        line += f"; {len(result['missing_predictions'])} references without prediction"
    if fg.get("lesion_wise") is not None:
        line += "; " + lesion_summary(fg["lesion_wise"], result["lesion_wise_options"]["matching"])
    return line


def write_results(result: dict, json_path: str | Path) -> Path:
    """Write ``result`` as JSON at ``json_path`` and a per-case per-label CSV beside it (``.csv``). Atomic."""
    json_path = Path(json_path)
    atomic_write_text(json_path, json.dumps(_json_safe(result), indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    lesion = "lesion_wise_options" in result
    header = ["case", "label", "dice", "iou", "hd95_mm", "hd95_undefined", "surface_dice", "n_pred", "n_ref"]
    writer.writerow(
        header + ([f"lesion_{k}" if not k.startswith("lesion") else k for k in LESION_KEYS] if lesion else [])
    )
    for c in result["cases"]:
        for lab, e in c["labels"].items():
            hd = e["hd95"]
            lw = [csv_number(e["lesion_wise"][k]) for k in LESION_KEYS] if lesion else []
            writer.writerow(
                [
                    c["case"],
                    lab,
                    f"{e['dice']:.6f}",
                    f"{e['iou']:.6f}",
                    "" if hd is None or not math.isfinite(hd) else f"{hd:.4f}",
                    int(bool(e["hd95_undefined"])),
                    "" if e["surface_dice"] is None else f"{e['surface_dice']:.6f}",
                    e["n_pred"],
                    e["n_ref"],
                    *lw,
                ]
            )
    csv_path = json_path.with_suffix(".csv")
    atomic_write_text(csv_path, buf.getvalue())
    return csv_path


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    label_ids: list[int] | None = None,
    num_workers: int = 1,
    output: str | Path | None = None,
    tolerance_mm: float = 1.0,
    progress: bool = True,
    ignore_label: int | None = None,
    regions: list[tuple[int, ...]] | None = None,
    lesion_wise: LesionWiseOptions | None = None,
) -> EvaluationReport:
    """Dice, IoU, HD95 (mm) and surface Dice per case and label, with means and standard deviations.

    Args:
        pred_dir: folder of predicted segmentations (original label ids).
        ref_dir: folder of reference segmentations; a dataset root with ``labelsTr/`` also works.
        label_ids: labels to evaluate; default every nonzero label found in any prediction or reference.
        num_workers: parallel processes.
        output: JSON path to write (a CSV with one row per case and label is written beside it);
            None writes nothing.
        tolerance_mm: surface Dice tolerance in mm.
        progress: show a progress bar.
        ignore_label: reference id of unannotated voxels, left out of prediction and reference (see the
            module docstring); default the one the reference dataset's ``dataset.json`` declares, if any.
        regions: region-based evaluation (nnU-Net v2): per region the label ids it holds; each region's
            mask (voxels whose id is in it) is evaluated instead of each label, keyed ``"3"`` /
            ``"(1, 2, 3)"``. Default the regions the reference dataset's ``dataset.json`` declares, if any;
            ``label_ids`` is then not used.
        lesion_wise: also lesion-wise metrics with these options (see
            :mod:`medseg.evaluation.lesion_wise`); None (default) computes none.

    Returns:
        :class:`EvaluationReport`, a JSON-ready dict: ``cases`` (per case ``labels -> {dice, iou, hd95,
        hd95_undefined, surface_dice, n_pred, n_ref}``), ``mean`` (per label means, ``*_std``,
        ``hd95_undefined_cases``), ``foreground_mean`` (mean over labels of the per-label means),
        ``summary`` (one line), ``missing_predictions``, and with ``lesion_wise`` a ``"lesion_wise"`` object
        per case-label and mean and ``lesion_wise_options``. Undefined HD95: ``inf`` in memory, JSON ``null``.

    Raises:
        MedsegError: a folder is missing or holds no images, a prediction has no reference, or shapes /
            geometries differ (all such problems listed at once, each naming the case).
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for name, d in (("prediction", pred_dir), ("reference", ref_dir)):
        if not d.is_dir():
            raise MedsegError(f"{d}: {name} folder not found")
    if ignore_label is None:
        ignore_label = _dataset_ignore_label(ref_dir)
    region_list = tuple(
        tuple(int(i) for i in r) for r in (regions if regions is not None else _dataset_regions(ref_dir))
    )
    if not _list_images(ref_dir) and (ref_dir / "labelsTr").is_dir():
        ref_dir = ref_dir / "labelsTr"
    refs = _list_images(ref_dir)
    preds = _list_images(pred_dir)
    maps = [c for c in preds if c.endswith(INSTANCE_MAP_TAIL) and c.removesuffix(INSTANCE_MAP_TAIL) in preds]
    preds = {c: p for c, p in preds.items() if c in refs or c not in maps}
    if not preds:
        raise MedsegError(f"{pred_dir}: no segmentation files (.nii.gz, .nii, .nrrd, .mha) found")
    problems = [f"case {c}: prediction {p} has no reference in {ref_dir}" for c, p in preds.items() if c not in refs]
    case_ids = [c for c in preds if c in refs]
    for c in case_ids:
        g_pred, g_ref = _header_geometry(preds[c]), _header_geometry(refs[c])
        diffs = g_pred.matches(g_ref)
        if diffs:
            problems.append(
                f"case {c}: prediction {preds[c].name} and reference {refs[c]} differ in geometry: " + "; ".join(diffs)
            )
    if problems:
        raise DatasetError(problems, header="cannot evaluate")
    missing = sorted(c for c in refs if c not in preds)
    if missing:
        logger.warning("%d reference case(s) have no prediction in %s (e.g. %s)", len(missing), pred_dir, missing[0])

    labels_arg = tuple(int(v) for v in label_ids) if label_ids is not None else None
    if labels_arg is not None and ignore_label is not None:
        labels_arg = tuple(v for v in labels_arg if v != ignore_label)
    jobs = [
        (c, preds[c], refs[c], labels_arg, float(tolerance_mm), ignore_label, region_list, lesion_wise)
        for c in case_ids
    ]
    cases = map_cases(
        _evaluate_case,
        jobs,
        num_workers,
        desc="evaluate",
        progress=progress,
        mp_context=multiprocessing.get_context("spawn"),
    )

    labels: list[Any] = (
        [region_key(r) for r in region_list]
        if region_list
        else list(labels_arg)
        if labels_arg is not None
        else sorted({int(k) for c in cases for k in c["labels"]})
    )
    empty: dict[str, Any] = dict(EMPTY_EMPTY)
    if lesion_wise is not None:
        empty["lesion_wise"] = lesion_wise_scores(np.zeros(1, bool), np.zeros(1, bool), (1.0,)).to_dict()
    for case in cases:  # a label absent from both masks of a case is an empty-vs-empty match
        for lab in labels:
            case["labels"].setdefault(str(lab), dict(empty))
        case["labels"] = {str(lab): case["labels"][str(lab)] for lab in labels}
    mean = _aggregate(cases, labels)
    fg: dict[str, Any] = {}
    for m in METRICS:
        vals = [v[m] for v in mean.values() if v[m] is not None]
        fg[m] = float(np.mean(vals)) if vals else None
    if lesion_wise is not None:
        fg["lesion_wise"] = mean_lesion_wise([v["lesion_wise"] for v in mean.values()])
    result = EvaluationReport(
        {
            "prediction_dir": str(pred_dir),
            "reference_dir": str(ref_dir),
            "label_ids": labels,
            "ignore_label": ignore_label,
            **({"regions": [list(r) for r in region_list]} if region_list else {}),
            "tolerance_mm": float(tolerance_mm),
            "num_cases": len(cases),
            "missing_predictions": missing,
            "conventions": "both masks empty: dice=iou=surface_dice=1, hd95=0; exactly one empty: dice=iou="
            "surface_dice=0, hd95 undefined (null, hd95_undefined=true, excluded from means)",
            **({"lesion_wise_options": lesion_wise.to_dict()} if lesion_wise is not None else {}),
            "mean": mean,
            "foreground_mean": fg,
            "cases": cases,
        }
    )
    result["summary"] = summary_line(result)
    if output is not None:
        write_results(result, output)
    return result
