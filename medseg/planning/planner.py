"""Turn a dataset fingerprint into a :class:`~medseg.planning.plan.Plan`.

The rules follow nnU-Net's published design (so that plans can be compared with nnU-Net v2's), with the
memory model replaced by medseg's measured estimate of one training step:

1. **Target spacing** and 2. **normalisation**: :mod:`medseg.planning.preprocessing_rules`.
3. **Configurations**: ``3d_fullres`` at the target spacing, ``2d`` (in-plane slices along Z) at the same
   spacing, and ``3d_lowres`` when the fullres patch covers less than a quarter of the median image: the
   spacing is coarsened in 3% steps (coarsest axes last) until the patch covers a quarter of the
   median image; it is dropped when it would shrink the median image by less than 2x. With
   ``3d_lowres`` comes ``3d_cascade_fullres``: ``3d_fullres`` (same spacing, patch, networks and
   preprocessed cache) with ``previous_stage = "3d_lowres"``, whose networks also take the one-hot
   low-resolution segmentation (one channel per foreground label, :mod:`medseg.preprocessing.previous_stage`).
4. **Patch and batch**, per configuration and architecture: :mod:`medseg.planning.memory_fitting`.
5. **Mirroring** (a medseg rule, not nnU-Net's): patch axes along which two foreground classes always lie
   in the same order are not mirrored in training or test-time augmentation
   (:mod:`medseg.planning.mirroring`).

Every shape and spacing is in array order ``(Z, Y, X)`` (``(Y, X)`` for 2D patches), spacing in mm.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import PlanError
from medseg.planning.memory import estimate_training_memory_gb
from medseg.planning.memory_fitting import Fitter, MemoryEstimator, fit_3d
from medseg.planning.mirroring import RULE as MIRROR_RULE
from medseg.planning.mirroring import plan_mirror_axes
from medseg.planning.plan import ConfigurationPlan, NetworkPlan, Plan
from medseg.planning.planner_options import PlannerOptions
from medseg.planning.preprocessing_rules import (
    ANISOTROPY_THRESHOLD,
    data_identifier,
    determine_normalization,
    determine_target_spacing,
    resampled_shapes,
)

if TYPE_CHECKING:
    from medseg.fingerprint import Fingerprint
    from medseg.io.dataset import DatasetInfo

logger = logging.getLogger(__name__)

LOWRES_CREATION_THRESHOLD = 0.25  # plan 3d_lowres when the fullres patch covers less of the median image
LOWRES_SPACING_STEP = 1.03
LOWRES_MIN_SHRINK = 2.0  # drop 3d_lowres when it shrinks the median image by less than this factor
#: the cascade's second stage, planned whenever 3d_lowres is
CASCADE_CONFIGURATION = "3d_cascade_fullres"
#: placeholder spacing (mm) of the missing Z axis of 2D images
SPACING_2D_PLACEHOLDER = 1.0


def _as_3d(spacing: Sequence[float], shape: Sequence[int]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    if len(spacing) == 3:
        return tuple(float(s) for s in spacing), tuple(int(s) for s in shape)
    if len(spacing) == 2:
        return (SPACING_2D_PLACEHOLDER, *map(float, spacing)), (1, *map(int, shape))
    raise PlanError(f"images must be 2D or 3D, got spacing {list(spacing)}")


def plan_dataset(
    ds: DatasetInfo,
    fp: Fingerprint,
    options: PlannerOptions | None = None,
    *,
    memory_estimator: MemoryEstimator | None = None,
) -> Plan:
    """Plan configurations, topology, patch and batch sizes for a dataset.

    Args:
        ds: the dataset (names, channels, label ids).
        fp: its fingerprint (:func:`medseg.fingerprint.extract_fingerprint`).
        options: what to size the plan for (defaults: 8 GB, ``unet``, cuda, fp32).
        memory_estimator: ``(net, in_channels, num_classes) -> GB`` of one training step at ``net.batch_size``;
            default :func:`medseg.planning.memory.estimate_training_memory_gb`.

    Returns:
        a validated :class:`Plan`.

    Raises:
        PlanError: invalid options, or a fingerprint that does not belong to the dataset.
    """
    options = options or PlannerOptions()
    options.check()
    if fp.num_cases == 0:
        raise PlanError("the fingerprint has no cases; nothing to plan")
    if len(fp.channel_names) != ds.num_channels:
        raise PlanError(
            f"the fingerprint has {len(fp.channel_names)} channels but dataset {ds.name!r} has {ds.num_channels}; "
            "delete fingerprint.json and re-run `medseg plan`"
        )
    estimator = memory_estimator or estimate_training_memory_gb
    num_classes = len(ds.regions) if ds.regions else len(ds.label_ids)  # network outputs
    fitter = Fitter(options, estimator, ds.num_channels, num_classes)
    default_arch = "unet" if "unet" in options.archs else options.archs[0]

    geo = [_as_3d(c.spacing, c.shape_after_crop) for c in fp.cases]
    spacings = np.array([g[0] for g in geo], dtype=np.float64)
    shapes = np.array([g[1] for g in geo], dtype=np.float64)
    is_2d_dataset = bool(np.median(shapes[:, 0]) <= 1)

    notes: dict[str, Any] = {"planner": "medseg nnU-Net-style rules with a measured memory model"}
    if is_2d_dataset:
        target = tuple(float(v) for v in np.median(spacings, axis=0))
        notes["spacing"] = {"median_spacing": list(target), "anisotropy_rule": "2D dataset: median spacing"}
    else:
        target, spacing_notes = determine_target_spacing(spacings, shapes)
        notes["spacing"] = spacing_notes
        if options.target_spacing is not None:
            target = tuple(float(v) for v in options.target_spacing)
            notes["spacing"]["override"] = "target spacing given by the caller (PlannerOptions.target_spacing)"
    new_shapes = resampled_shapes(spacings, shapes, target)
    median_shape = np.median(new_shapes, axis=0)
    total_voxels = float(np.prod(new_shapes, axis=1, dtype=np.float64).sum())
    notes["spacing"]["target_spacing"] = list(target)
    notes["median_shape_after_resampling"] = [float(v) for v in median_shape]
    notes["total_voxels_after_resampling"] = total_voxels

    normalization, norm_notes = determine_normalization(ds.channel_names, fp)
    notes["normalization"] = norm_notes
    notes["memory"] = {
        "budget_gb": options.gpu_memory_gb,
        "precision": options.precision,
        "device": options.device,
        "rule": "shrink the patch while batch 2 exceeds the budget; then the largest batch that fits, "
        "capped at 5% of the dataset's voxels, at least 2",
    }
    config_notes: dict[str, Any] = {}
    configurations: dict[str, ConfigurationPlan] = {}
    label_names = {int(i): str(n) for i, n in zip(ds.label_ids, ds.label_names)}
    notes["mirroring"] = MIRROR_RULE

    def make_config(
        name: str,
        dims: int,
        spacing3: tuple[float, ...],
        median3: np.ndarray,
        total: float,
        fixed: dict[str, tuple[NetworkPlan, dict[str, Any]]] | None = None,
    ) -> ConfigurationPlan:
        """Plan every arch for one configuration; ``fixed`` holds archs already fitted."""
        nets: dict[str, NetworkPlan] = {}
        cnotes: dict[str, Any] = {"median_shape": [float(v) for v in median3], "total_voxels": total}
        for arch in options.archs:
            if fixed and arch in fixed:
                net, n = fixed[arch]
            elif dims == 3:
                net, n = fit_3d(fitter, arch, spacing3, median3, total)
            else:
                net, n = fitter.fit(arch, spacing3[1:], median3[1:], total)
            nets[arch] = net
            cnotes[arch] = n
        patch_axes = (0, 1, 2) if dims == 3 else ((0, 1) if is_2d_dataset else (1, 2))
        mirror_axes, cnotes["mirroring"] = plan_mirror_axes(fp, patch_axes, label_names)
        config_notes[name] = cnotes
        return ConfigurationPlan(
            name=name,
            dims=dims,
            spacing=tuple(float(s) for s in spacing3),
            median_shape=tuple(round(float(v)) for v in median3),
            normalization=normalization,
            networks=nets,
            default_arch=default_arch,
            data_identifier=data_identifier(spacing3, normalization),
            mirror_axes=mirror_axes,
        )

    if not is_2d_dataset:
        full = make_config("3d_fullres", 3, target, median_shape, total_voxels)
        configurations["3d_fullres"] = full
        lowres = _plan_lowres(fitter, default_arch, full, median_shape, total_voxels, notes)
        if lowres is not None:
            low_spacing, low_median, low_total, fitted = lowres
            configurations["3d_lowres"] = make_config(
                "3d_lowres", 3, low_spacing, low_median, low_total, fixed={default_arch: fitted}
            )
            configurations[CASCADE_CONFIGURATION] = dataclasses.replace(
                full, name=CASCADE_CONFIGURATION, previous_stage="3d_lowres"
            )
            config_notes[CASCADE_CONFIGURATION] = {
                "rule": "3d_fullres (spacing, patch, networks, preprocessed data) refining the 3d_lowres "
                "segmentation: its one-hot foreground labels are extra input channels "
                f"({len(ds.label_ids) - 1} after the {ds.num_channels} image channel(s)); training uses "
                "each case's prediction by the 3d_lowres fold that held it out; memory estimate of "
                "3d_fullres (the extra input channels add little)",
            }
    configurations["2d"] = make_config("2d", 2, target, median_shape, total_voxels)
    coarsest = int(np.argmax(target))
    if not is_2d_dataset and coarsest != 0 and target[coarsest] > ANISOTROPY_THRESHOLD * min(target):
        notes["2d_slicing"] = (
            f"2d trains on slices along Z although axis {coarsest} is the coarsest; its in-plane patch therefore "
            "includes the coarse axis (nnU-Net would transpose the data to slice along the coarse axis)"
        )
    notes["configurations"] = config_notes
    notes["memory"]["estimator_calls"] = fitter.calls

    plan = Plan(
        dataset_name=ds.name,
        channel_names=tuple(ds.channel_names),
        label_ids=tuple(int(v) for v in ds.label_ids),
        label_names=tuple(ds.label_names),
        ignore_label=ds.ignore_label,
        regions=tuple(tuple(int(i) for i in r) for r in ds.regions) or None,
        regions_class_order=tuple(int(i) for i in ds.regions_class_order) or None,
        original_median_spacing=tuple(float(v) for v in np.median(spacings, axis=0)),
        original_median_shape=tuple(round(float(v)) for v in np.median(shapes, axis=0)),
        configurations=configurations,
        default_configuration="3d_fullres" if "3d_fullres" in configurations else "2d",
        device=options.device,
        gpu_memory_gb=float(options.gpu_memory_gb),
        time_budget_minutes=options.time_budget_minutes,
        notes=notes,
    )
    for name, cfg in plan.configurations.items():
        net = cfg.network()
        logger.info(
            "%s: spacing %s, patch %s, batch %d, %d stages, ~%.2f GB",
            name,
            [round(s, 4) for s in cfg.spacing],
            list(cfg.patch_size),
            cfg.batch_size,
            net.spec.num_stages,
            net.estimated_memory_gb or float("nan"),
        )
    return plan.validate()


def _plan_lowres(
    fitter: Fitter,
    arch: str,
    full: ConfigurationPlan,
    median_shape: np.ndarray,
    total_voxels: float,
    notes: dict[str, Any],
) -> tuple[tuple[float, ...], np.ndarray, float, tuple[NetworkPlan, dict[str, Any]]] | None:
    """Coarsen the spacing until the patch covers a quarter of the median image; None when not needed."""
    full_spacing = np.asarray(full.spacing, dtype=np.float64)
    median_vox_full = float(np.prod(median_shape, dtype=np.float64))
    coverage = float(np.prod(full.patch_size, dtype=np.float64)) / median_vox_full
    lnotes: dict[str, Any] = {"fullres_patch_coverage": round(coverage, 4)}
    notes["3d_lowres"] = lnotes
    if coverage >= LOWRES_CREATION_THRESHOLD:
        lnotes["decision"] = (
            f"not needed: the 3d_fullres patch covers {coverage:.0%} >= {LOWRES_CREATION_THRESHOLD:.0%} "
            "of the median image"
        )
        return None
    spacing = full_spacing.copy()
    fitted: tuple[NetworkPlan, dict[str, Any]] | None = None
    low_median = median_shape.astype(np.float64)
    steps = 0
    while coverage < LOWRES_CREATION_THRESHOLD and steps < 1000:
        coarse = spacing.max() / spacing > 2
        if coarse.any():  # bring the fine axes towards the coarse one first
            spacing[coarse] *= LOWRES_SPACING_STEP
        else:
            spacing *= LOWRES_SPACING_STEP
        steps += 1
        low_median = full_spacing / spacing * median_shape
        low_vox = float(np.prod(low_median, dtype=np.float64))
        rounded = np.array([round(v) for v in low_median], dtype=np.float64)
        fitted = fit_3d(fitter, arch, tuple(spacing), rounded, total_voxels * low_vox / median_vox_full)
        coverage = float(np.prod(fitted[0].patch_size, dtype=np.float64)) / low_vox
    shrink = median_vox_full / float(np.prod(low_median, dtype=np.float64))
    lnotes.update(
        steps=steps,
        spacing=[float(s) for s in spacing],
        median_shape=[float(v) for v in low_median],
        image_shrink_factor=round(shrink, 3),
    )
    if fitted is None or shrink < LOWRES_MIN_SHRINK:
        lnotes["decision"] = (
            f"dropped: the low-resolution images would be only {shrink:.2f}x smaller than at full resolution"
        )
        return None
    lnotes["decision"] = (
        f"planned: the 3d_fullres patch covers only {lnotes['fullres_patch_coverage']:.0%} of the median image; "
        f"at spacing {[round(s, 4) for s in spacing]} the patch covers {coverage:.0%}"
    )
    rounded = np.array([round(v) for v in low_median], dtype=np.float64)
    return tuple(float(s) for s in spacing), rounded, total_voxels / shrink, fitted


__all__ = ["CASCADE_CONFIGURATION", "PlannerOptions", "plan_dataset"]
