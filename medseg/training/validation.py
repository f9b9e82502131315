"""Final validation of a run: sliding-window prediction of the fold's held-out cases.

For every held-out case: the trained network predicts the preprocessed image with the full sliding
window (Gaussian weighting, mirror TTA) through :class:`medseg.inference.predictor.Predictor`; the
probabilities are mapped back to the original grid; ``validation/<case>.nii.gz`` (original label ids
and geometry), ``validation/<case>.npz`` (``probabilities`` float16 ``(K, Z, Y, X)``, original grid) and
``validation/metrics.json`` (per-case, per-class Dice) are written. The reference is the original label
file of the raw dataset (``WORK/dataset_ref.json``), or, when that is not available, the preprocessed
label mapped back to the original grid.

A time-budgeted run passes a :class:`~medseg.training.validation_budget.ValidationBudget`: the validation
is shortened to the time left (fewer TTA passes, then fewer cases) and stopped at the deadline, and
``metrics.json`` records what was left out (:mod:`medseg.training.validation_budget`).

During training: the per-epoch pseudo Dice on held-out patches (:func:`pseudo_dice`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.distributed import DistContext
from medseg.faults import maybe_fail
from medseg.inference import EnsembleMember, Predictor
from medseg.inference.sliding_window import PredictionStopped
from medseg.io.dataset import load_dataset
from medseg.io.image import atomic_write_bytes, atomic_write_text, read_image
from medseg.io.workdir import RunDir, WorkDir
from medseg.planning.stage import Stage
from medseg.preprocessing import classes_to_labels, export_segmentation, revert_to_original
from medseg.preprocessing.regions import dice_per_region, probabilities_to_classes, region_key
from medseg.progress import progress_bar
from medseg.training.data import PatchSampler, single_threaded
from medseg.training.device import autocast, to_device
from medseg.training.losses import hard_dice_counts
from medseg.training.previous_stage import load_network_input
from medseg.training.region_losses import region_dice_counts
from medseg.training.validation_budget import ValidationBudget, ValidationClock, ValidationNetwork

logger = logging.getLogger(__name__)


def _reference_label_files(work_dir: Path) -> dict[str, Path]:
    """Case id -> original label file, from ``WORK/dataset_ref.json`` (empty when unavailable)."""
    ref = WorkDir(work_dir).dataset_ref
    if not ref.is_file():
        return {}
    try:
        root = Path(json.loads(ref.read_text())["root"])
        ds = load_dataset(root)
    except Exception as exc:  # the raw data may have moved; fall back to the preprocessed labels
        logger.info("reference labels from %s unavailable (%s); using the preprocessed labels", ref, exc)
        return {}
    return {c.case_id: c.label_file for c in ds.cases if c.label_file is not None}


def dice_per_label(
    pred: np.ndarray, ref: np.ndarray, label_ids: list[int], ignore_label: int | None = None
) -> dict[str, float | None]:
    """Dice of each label id (None when the label is absent from both prediction and reference).

    Voxels where ``ref`` holds ``ignore_label`` are left out of prediction and reference.
    """
    return dice_per_region(pred, ref, [(lab,) for lab in label_ids], ignore_label)


def validate_run(
    model: torch.nn.Module,
    stage: Stage,
    work_dir: Path,
    run_dir: Path,
    case_ids: list[str],
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    use_tta: bool = True,
    save_probabilities: bool = True,
    extra: dict[str, Any] | None = None,
    budget: ValidationBudget | None = None,
) -> dict[str, Any]:
    """Predict ``case_ids`` with ``model`` and write ``run_dir/validation/`` (see the module docstring).

    Args:
        model: the trained network (put in eval mode here).
        stage: what it was trained with (the run's plan, configuration and architecture).
        work_dir: the work folder (preprocessed cases, ``dataset_ref.json``).
        run_dir: the run folder.
        case_ids: held-out cases.
        device / precision / channels_last: inference settings.
        use_tta: mirror test-time augmentation.
        save_probabilities: write the ``.npz`` probabilities.
        extra: further entries for ``metrics.json`` (e.g. the checkpoint's iteration).
        budget: the time a time-budgeted run has left for its validation (None = no limit); see
            :class:`~medseg.training.validation_budget.ValidationClock`.

    Returns:
        The metrics dict written to ``validation/metrics.json`` (with ``validation_seconds``, and
        ``time_budget`` when a budget was given).
    """
    plan, configuration = stage.plan, stage.config_name
    run = RunDir(run_dir)
    out_dir = run.validation
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    member = EnsembleMember.of_stage(model, stage, source=str(run_dir))
    predictor = Predictor([member], device=device, use_tta=use_tta, precision=precision, channels_last=channels_last)
    references = _reference_label_files(work_dir)
    label_ids = [int(v) for v in plan.label_ids]
    fg = label_ids[1:]
    per_case: dict[str, dict[str, float | None]] = {}
    clock = None
    if budget is not None:
        clock = ValidationClock(budget, case_ids, ValidationNetwork.of_stage(stage, use_tta))
        if clock.plan.shortened:
            logger.warning("final validation %s", clock.plan.note())
    t_start = time.perf_counter()
    for cid in progress_bar(case_ids, desc="final validation", unit="case"):
        passes = None
        if clock is not None:
            passes = clock.passes_for(cid)
            if passes is None:
                continue
            predictor.tta_passes = passes
        t_case = time.perf_counter()
        data, seg_pp, props = load_network_input(work_dir, plan, configuration, cid)  # + a cascade's previous stage
        try:
            probs = predictor.predict_preprocessed(
                data, configuration, should_stop=None if clock is None else clock.over
            )
        except PredictionStopped:
            assert clock is not None
            clock.interrupted(cid)
            continue
        probs = revert_to_original(probs, props, background_outside=not plan.is_region_based)
        classes = probabilities_to_classes(probs, plan)
        export_segmentation(classes, props, label_ids, run.validation_file(cid, ".nii.gz"))
        if save_probabilities:
            buf = io.BytesIO()
            np.savez_compressed(buf, probabilities=probs.astype(np.float16), label_ids=np.asarray(label_ids))
            atomic_write_bytes(run.validation_file(cid, ".npz"), buf.getvalue())
        pred_labels = classes_to_labels(classes, label_ids)
        ref = None
        if cid in references:
            try:
                ref, _ = read_image(references[cid])
                if ref.shape != pred_labels.shape:
                    ref = None
            except Exception:  # unreadable reference: fall back below
                ref = None
        if ref is None and seg_pp is not None:
            ref = classes_to_labels(
                revert_to_original(seg_pp, props, is_seg=True), label_ids, ignore_label=plan.ignore_label
            )
        if ref is not None:
            per_case[cid] = (
                dice_per_region(pred_labels, ref, plan.regions or (), plan.ignore_label)
                if plan.is_region_based
                else dice_per_label(pred_labels, ref, fg, ignore_label=plan.ignore_label)
            )
        if clock is not None:
            assert passes is not None
            clock.done(cid, passes, time.perf_counter() - t_case)
        maybe_fail("final_validation", cid)
    mean: dict[str, float | None] = {}
    keys = [region_key(r) for r in plan.regions] if plan.regions else [str(lab) for lab in fg]
    for key in keys:
        vals = [v for d in per_case.values() if (v := d.get(key)) is not None]
        mean[key] = float(np.mean(vals)) if vals else None
    valid = [v for v in mean.values() if v is not None]
    metrics = {
        "configuration": configuration,
        "arch": stage.arch,
        "label_ids": label_ids,
        "label_names": list(plan.label_names),
        **(
            {"regions": [list(r) for r in plan.regions], "regions_class_order": list(plan.regions_class_order or ())}
            if plan.regions
            else {}
        ),
        "num_cases": len(per_case),
        "mean_dice": mean,
        "mean_foreground_dice": float(np.mean(valid)) if valid else None,
        "per_case": per_case,
        "validation_seconds": round(time.perf_counter() - t_start, 2),
        **(extra or {}),
    }
    if clock is not None:
        metrics["time_budget"] = clock.record()
        if clock.skipped:
            logger.warning(
                "final validation skipped %d held-out case(s) to meet the time budget: %s",
                len(clock.skipped),
                ", ".join(f"{c} ({why})" for c, why in clock.skipped.items()),
            )
    atomic_write_text(run.validation_metrics, json.dumps(metrics, indent=1) + "\n")
    names = {str(k): n for k, n in zip(label_ids, plan.label_names)}
    logger.info(
        "final validation on %d cases: %s (mean %s)",
        len(per_case),
        ", ".join(f"{names.get(k, k)} {v:.4f}" for k, v in mean.items() if v is not None),
        f"{metrics['mean_foreground_dice']:.4f}" if metrics["mean_foreground_dice"] is not None else "-",
    )
    return metrics


# ---------------------------------------------------------------------- during training
@torch.no_grad()
def pseudo_dice(
    model: torch.nn.Module,
    sampler: PatchSampler,
    batches: Sequence[int],
    batch_lo: int,
    batch_hi: int,
    num_classes: int,
    dist_ctx: DistContext,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    regions: Sequence[Sequence[int]] = (),
    ignore_index: int | None = None,
) -> tuple[dict[str, Any], float | None]:
    """Dice of the argmax (region plans: of each region's ``sigmoid > 0.5``) on held-out patches (no augmentation).

    TP/FP/FN are summed over all batches (and ranks) per class before the Dice is taken.

    Args:
        model: the network (not a DDP wrapper); in eval mode during the call, in train mode afterwards.
        sampler: the held-out patch sampler.
        batches: indices of the batches to draw (different ones every epoch).
        batch_lo / batch_hi: this rank's samples of each batch.
        num_classes: classes of the network output (background included).
        dist_ctx: the distributed context (counts are summed over ranks).
        device / amp_dtype / channels_last: how the network computes.
        regions: region plans: per region (output channel) the class indices it holds; then the Dice is
            per region and ``num_classes`` is the number of regions.
        ignore_index: class index of unannotated voxels (region plans; softmax plans skip any index >= K).

    Returns:
        ``({"val_dice": mean foreground Dice, "dice_per_class": [...]}, forward seconds per sample)``;
        ``({}, None)`` without batches. Classes absent from prediction and reference have Dice None
        and do not count towards the mean.
    """
    if not batches:
        return {}, None
    model.eval()
    counts = torch.zeros((3, num_classes), dtype=torch.int64)
    t = time.perf_counter()
    samples = 0
    try:
        for j in batches:
            with single_threaded():
                x, y = sampler.batch(j, batch_lo, batch_hi)
            x, y = to_device(x, y, device, channels_last)
            with autocast(device, amp_dtype):
                out = model(x)
            if isinstance(out, (list, tuple)):
                out = out[0]
            counts += region_dice_counts(out, y, regions, ignore_index) if regions else hard_dice_counts(out.float(), y)
            samples += x.shape[0]
    finally:
        model.train()
    per_sample = (time.perf_counter() - t) / samples if samples else None
    dist_ctx.all_reduce_sum(counts)
    tp, fp, fn = counts.double()
    denom = 2 * tp + fp + fn
    dice = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(denom, float("nan")))
    dice = dice if regions else dice[1:]  # regions have no background channel
    valid = dice[~torch.isnan(dice)]
    mean = float(valid.mean()) if valid.numel() else float("nan")
    return {
        "val_dice": mean,
        "dice_per_class": [None if math.isnan(v) else float(v) for v in dice.tolist()],
    }, per_sample
