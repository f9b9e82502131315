"""Turn a dataset fingerprint into a :class:`~medseg.planning.plan.Plan`.

The rules follow nnU-Net's published design (so that plans can be compared with nnU-Net v2's), with the
memory model replaced by medseg's measured estimate of one training step:

1. **Target spacing**: per-axis median of the case spacings. When the coarsest axis is more than 3x coarser
   than the other axes *and* short (its median length x 3 < the shortest other axis), its 10th percentile
   spacing is used instead (never finer than the other axes), to avoid interpolating thick slices.
2. **Normalisation**: channels named ``CT`` are clipped to the foreground 0.5/99.5 percentiles and z-scored
   with the foreground mean/std of the whole dataset; ``noNorm`` channels are left alone; every other
   channel is z-scored per image, inside the nonzero mask when cropping to the nonzero region removed at
   least a quarter of the median image.
3. **Configurations**: ``3d_fullres`` at the target spacing, ``2d`` (in-plane slices along Z) at the same
   spacing, and ``3d_lowres`` when the fullres patch covers less than a quarter of the median image: the
   spacing is coarsened in 3% steps (coarsest axes last) until the patch covers a quarter of the
   median image; it is dropped when it would shrink the median image by less than 2x.
4. **Patch and batch**: start from a patch with the aspect ratio of ``1/spacing`` and the volume of
   256^3 (3D) / 2048^2 (2D) voxels, capped at the median image; derive the topology
   (:mod:`medseg.planning.topology`); while one training step at batch 2 needs more than the memory budget,
   shrink the axis that is largest relative to the median image by one pooling multiple. Then the batch
   is the largest that fits the budget, but at most what covers 5% of the dataset's voxels, and at least 2.
5. **Mirroring** (a medseg rule, not nnU-Net's): patch axes along which two foreground classes always lie
   in the same order are not mirrored in training or test-time augmentation
   (:mod:`medseg.planning.mirroring`).

Every shape and spacing is in array order ``(Z, Y, X)`` (``(Y, X)`` for 2D patches), spacing in mm.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import PlanError
from medseg.planning.mirroring import RULE as MIRROR_RULE
from medseg.planning.mirroring import plan_mirror_axes
from medseg.planning.plan import ConfigurationPlan, NetworkPlan, NormalizationSpec, Plan
from medseg.planning.topology import MIN_FEATURE_MAP_SIZE, Topology, compute_topology

if TYPE_CHECKING:
    from medseg.fingerprint import Fingerprint
    from medseg.io.dataset import DatasetInfo

logger = logging.getLogger(__name__)

#: (net, in_channels, num_classes) -> GB needed by one training step at ``net.batch_size``.
MemoryEstimator = Callable[[NetworkPlan, int, int], float]

ANISOTROPY_THRESHOLD = 3.0
NONZERO_MASK_THRESHOLD = 0.75  # use the nonzero mask when cropping keeps less than this fraction
LOWRES_CREATION_THRESHOLD = 0.25  # plan 3d_lowres when the fullres patch covers less of the median image
LOWRES_SPACING_STEP = 1.03
LOWRES_MIN_SHRINK = 2.0  # drop 3d_lowres when it shrinks the median image by less than this factor
MAX_DATASET_COVERED = 0.05  # one batch sees at most this fraction of the dataset's voxels
MIN_BATCH_SIZE = 2
MIN_PATCH_EDGE = 2 * MIN_FEATURE_MAP_SIZE  # the memory fitting never shrinks a patch axis below this
REFERENCE_PATCH_VOXELS = {3: 256**3, 2: 2048**2}
DEFAULT_MAX_FEATURES = {3: 320, 2: 512}
#: placeholder spacing (mm) of the missing Z axis of 2D images
SPACING_2D_PLACEHOLDER = 1.0


@dataclass(frozen=True)
class PlannerOptions:
    """What the plan is sized for.

    Attributes:
        gpu_memory_gb: memory one training step may use (GB) on the training device.
        archs: architectures to plan (registry names); the first is the default unless ``unet`` is among them.
        device: device the plan is sized for (``cuda`` or ``cpu``), recorded in the plan.
        time_budget_minutes: training time budget recorded in the plan (None = full schedule).
        precision: training precision the memory is estimated for (``fp32``, ``bf16``, ``fp16``).
        base_features: channels of the first stage.
        max_features: cap on channels per stage; None = 320 for 3D, 512 for 2D.
        max_poolings: cap on poolings per axis; None = limited only by the minimum feature map size (4).
    """

    gpu_memory_gb: float = 8.0
    archs: tuple[str, ...] = ("unet",)
    device: str = "cuda"
    time_budget_minutes: float | None = None
    precision: str = "fp32"
    base_features: int = 32
    max_features: int | None = None
    max_poolings: int | None = None

    def check(self) -> None:
        problems = []
        if not (self.gpu_memory_gb > 0 and math.isfinite(self.gpu_memory_gb)):
            problems.append(f"gpu_memory_gb must be a positive number, got {self.gpu_memory_gb}")
        if not self.archs:
            problems.append("archs must name at least one architecture")
        if len(set(self.archs)) != len(self.archs):
            problems.append(f"archs has duplicates: {list(self.archs)}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            problems.append(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.device not in ("cpu", "cuda"):
            problems.append(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.base_features < 1 or (self.max_features is not None and self.max_features < self.base_features):
            problems.append("need 1 <= base_features <= max_features")
        if self.time_budget_minutes is not None and not self.time_budget_minutes > 0:
            problems.append(f"time_budget_minutes must be positive, got {self.time_budget_minutes}")
        if problems:
            raise PlanError("invalid planner options: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- rules
def determine_target_spacing(
    spacings: np.ndarray, shapes: np.ndarray, threshold: float = ANISOTROPY_THRESHOLD
) -> tuple[tuple[float, ...], dict[str, Any]]:
    """Target spacing of the full-resolution configuration.

    Args:
        spacings: per-case spacings in mm, ``(num_cases, 3)`` in ``(Z, Y, X)`` order.
        shapes: per-case shapes after cropping, ``(num_cases, 3)``.
        threshold: anisotropy factor (3).

    Returns:
        ``(spacing, notes)``: the target spacing ``(Z, Y, X)`` in mm and the reasoning.
    """
    spacings = np.asarray(spacings, dtype=np.float64)
    shapes = np.asarray(shapes, dtype=np.float64)
    target = np.median(spacings, axis=0)
    median_size = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    other_spacing = max(target[a] for a in others)
    other_size = min(median_size[a] for a in others)
    aniso_spacing = bool(target[worst] > threshold * other_spacing)
    aniso_voxels = bool(median_size[worst] * threshold < other_size)
    notes: dict[str, Any] = {
        "median_spacing": [float(v) for v in target],
        "median_shape_after_crop": [float(v) for v in median_size],
        "coarsest_axis": worst,
        "anisotropic_spacing": aniso_spacing,
        "anisotropic_shape": aniso_voxels,
    }
    if aniso_spacing and aniso_voxels:
        p10 = float(np.percentile(spacings[:, worst], 10))
        chosen = p10 if p10 >= other_spacing else other_spacing + 1e-5
        target[worst] = chosen
        notes["anisotropy_rule"] = (
            f"axis {worst} is {notes['median_spacing'][worst] / other_spacing:.2f}x coarser than the others and its "
            f"median length {median_size[worst]:g} x {threshold:g} < {other_size:g}: using its 10th percentile spacing "
            f"{p10:.5g} mm" + ("" if p10 >= other_spacing else f", raised to the other axes' {other_spacing:.5g} mm")
        )
    else:
        notes["anisotropy_rule"] = "not applied (median spacing used on every axis)"
    return tuple(float(v) for v in target), notes


def resampled_shapes(spacings: np.ndarray, shapes: np.ndarray, target: Sequence[float]) -> np.ndarray:
    """Per-case shapes after resampling to ``target`` (rounded), ``(num_cases, 3)`` float64."""
    spacings = np.asarray(spacings, dtype=np.float64)
    shapes = np.asarray(shapes, dtype=np.float64)
    return np.round(spacings / np.asarray(target, dtype=np.float64) * shapes)


def determine_normalization(
    channel_names: Sequence[str], fp: Fingerprint
) -> tuple[tuple[NormalizationSpec, ...], list[str]]:
    """One :class:`NormalizationSpec` per channel, and the reasoning (one line per channel)."""
    relative = fp.median_relative_size_after_crop()
    use_mask = relative < NONZERO_MASK_THRESHOLD
    specs: list[NormalizationSpec] = []
    notes: list[str] = []
    for c, name in enumerate(channel_names):
        key = str(name).strip().casefold()
        if key == "ct":
            st = fp.intensity[c]
            if st.num_samples == 0:
                raise PlanError(
                    f"channel {c} ({name}) is CT but the dataset has no foreground voxels to take the intensity "
                    "statistics from; check the label files"
                )
            specs.append(
                NormalizationSpec(
                    scheme="ct",
                    use_nonzero_mask=False,
                    clip_low=st.percentile_00_5,
                    clip_high=st.percentile_99_5,
                    mean=st.mean,
                    std=st.std,
                )
            )
            notes.append(
                f"channel {c} ({name}): CT -> clip to foreground [{st.percentile_00_5:.5g}, {st.percentile_99_5:.5g}] "
                f"then (x - {st.mean:.5g}) / {st.std:.5g}"
            )
        elif key in ("nonorm", "none"):
            specs.append(NormalizationSpec(scheme="none"))
            notes.append(f"channel {c} ({name}): no normalisation (channel name {name!r})")
        else:
            specs.append(NormalizationSpec(scheme="zscore", use_nonzero_mask=use_mask))
            notes.append(
                f"channel {c} ({name}): per-image z-score"
                + (
                    f" inside the nonzero mask (cropping keeps a median {relative:.0%} of the image)"
                    if use_mask
                    else f" over the whole image (cropping keeps a median {relative:.0%} of the image)"
                )
            )
    return tuple(specs), notes


def data_identifier(spacing: Sequence[float], normalization: Sequence[NormalizationSpec]) -> str:
    """Name of the preprocessed-data folder; equal for configurations sharing spacing and normalisation."""
    sp = "x".join(f"{s:.6g}" for s in spacing)
    norms = "+".join(n.scheme + ("-nz" if n.use_nonzero_mask else "") for n in normalization)
    return f"spacing_{sp}_{norms}"


# ---------------------------------------------------------------------------------------------- fitting
class _Fitter:
    """Patch/batch fitting against a memory estimator, with every estimate memoised."""

    def __init__(self, options: PlannerOptions, estimator: MemoryEstimator, in_channels: int, num_classes: int):
        self.options = options
        self.estimator = estimator
        self.in_channels = in_channels
        self.num_classes = num_classes
        self._cache: dict[str, float] = {}
        self.calls = 0

    def max_features(self, dims: int) -> int:
        return self.options.max_features or DEFAULT_MAX_FEATURES[dims]

    def network(self, arch: str, topo: Topology, batch: int) -> NetworkPlan:
        dims = len(topo.patch_size)
        return NetworkPlan(
            arch=arch,
            patch_size=topo.patch_size,
            batch_size=batch,
            kernel_sizes=topo.kernel_sizes,
            strides=topo.strides,
            base_features=self.options.base_features,
            max_features=max(self.max_features(dims), self.options.base_features),
            options=arch_options(arch),
            precision=self.options.precision,
        )

    def estimate(self, net: NetworkPlan) -> float:
        key = json.dumps([_net_key(net), self.in_channels, self.num_classes], sort_keys=True)
        if key not in self._cache:
            self.calls += 1
            gb = float(self.estimator(net, self.in_channels, self.num_classes))
            if not (gb > 0 and math.isfinite(gb)):
                raise PlanError(f"memory estimate for {net.arch} patch {list(net.patch_size)} is {gb}; expected > 0")
            self._cache[key] = gb
        return self._cache[key]

    def fit(
        self, arch: str, spacing: Sequence[float], median_shape: Sequence[float], total_voxels: float
    ) -> tuple[NetworkPlan, dict[str, Any]]:
        """Largest patch (then batch) of ``arch`` that fits the budget.

        Args:
            spacing: spacing of the patch axes (2 or 3 entries), mm.
            median_shape: median image shape after resampling (same axes), may be fractional.
            total_voxels: voxels of the whole resampled dataset (for the 5% batch cap).
        """
        dims = len(spacing)
        budget = self.options.gpu_memory_gb
        inv = 1.0 / np.asarray(spacing, dtype=np.float64)
        scale = (REFERENCE_PATCH_VOXELS[dims] / float(np.prod(inv))) ** (1.0 / dims)
        initial = [min(float(round(v * scale)), float(m)) for v, m in zip(inv, median_shape)]
        topo = self._topology(spacing, initial)
        notes: dict[str, Any] = {
            "initial_patch": [float(v) for v in initial],
            "first_topology_patch": list(topo.patch_size),
        }

        def cap_of(t: Topology) -> int:
            voxels = float(np.prod(t.patch_size, dtype=np.float64))
            return max(MIN_BATCH_SIZE, math.floor(MAX_DATASET_COVERED * total_voxels / voxels))

        # Shortcut for small images: when the capped batch fits, batch 2 fits too (memory grows with the batch).
        cap = cap_of(topo)
        if cap > MIN_BATCH_SIZE and self.estimate(self.network(arch, topo, cap)) <= budget:
            notes.update(shrink_steps=0, fits_budget=True)
            return self._finish(arch, topo, cap, notes, self._cap_rule(cap, topo, total_voxels))
        est = self.estimate(self.network(arch, topo, MIN_BATCH_SIZE))
        notes["first_estimate_gb_at_batch_2"] = round(est, 4)
        shrink_steps = 0
        fits = est <= budget
        if not fits:
            topo, shrink_steps, fits = self._first_fitting(arch, spacing, topo, median_shape, est)
            est = self.estimate(self.network(arch, topo, MIN_BATCH_SIZE))
            if not fits:
                logger.warning(
                    "%s: even the smallest patch %s needs %.2f GB at batch 2 (> %.2f GB budget)",
                    arch, list(topo.patch_size), est, budget,
                )
        notes.update(shrink_steps=shrink_steps, fits_budget=fits, estimate_gb_at_batch_2=round(est, 4))
        cap = cap_of(topo)
        if not fits:
            return self._finish(arch, topo, MIN_BATCH_SIZE, notes, "does not fit the budget even at batch 2: batch 2")
        if cap == MIN_BATCH_SIZE or self.estimate(self.network(arch, topo, cap)) <= budget:
            return self._finish(arch, topo, cap, notes, self._cap_rule(cap, topo, total_voxels))
        lo, hi = MIN_BATCH_SIZE, cap  # est(lo) <= budget < est(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.estimate(self.network(arch, topo, mid)) <= budget:
                lo = mid
            else:
                hi = mid
        rule = f"limited by memory: batch {lo + 1} would exceed {budget:g} GB (5% cap: {cap})"
        return self._finish(arch, topo, lo, notes, rule)

    @staticmethod
    def _cap_rule(cap: int, topo: Topology, total_voxels: float) -> str:
        if cap == MIN_BATCH_SIZE:
            return "minimum batch 2 (the 5% dataset cap allows no more)"
        voxels = int(np.prod(topo.patch_size))
        return f"limited by the 5% dataset cap: {cap} x {voxels} voxels <= 5% of {total_voxels:.4g}"

    def _finish(
        self, arch: str, topo: Topology, batch: int, notes: dict[str, Any], rule: str
    ) -> tuple[NetworkPlan, dict[str, Any]]:
        net = self.network(arch, topo, batch)
        net = replace(net, estimated_memory_gb=round(self.estimate(net), 4))
        notes.update(batch_rule=rule, batch_size=batch, estimated_memory_gb=net.estimated_memory_gb)
        return net, notes

    def _first_fitting(
        self, arch: str, spacing: Sequence[float], topo: Topology, median_shape: Sequence[float], est0: float
    ) -> tuple[Topology, int, bool]:
        """The first patch of the shrinking chain that fits at batch 2, its index, and whether it fits.

        The shrinking rule visits a fixed chain of ever smaller patches whose memory falls
        along the chain, so the first one that fits is found without estimating every link: guess it from
        memory roughly proportional to patch voxels, then gallop and bisect with real estimates. The result
        is the one a step-by-step walk would give.
        """
        budget = self.options.gpu_memory_gb
        chain = [topo]
        while (smaller := self._shrink(spacing, chain[-1], median_shape)) is not None:
            chain.append(smaller)
        if len(chain) == 1:
            return topo, 0, False

        def fits(i: int) -> bool:
            return i == 0 and est0 <= budget or i > 0 and self.estimate(
                self.network(arch, chain[i], MIN_BATCH_SIZE)) <= budget

        vox0 = float(np.prod(topo.patch_size, dtype=np.float64))
        guess = next(
            (i for i, t in enumerate(chain) if est0 * float(np.prod(t.patch_size, dtype=np.float64)) / vox0 <= budget),
            len(chain) - 1,
        )
        guess = max(1, guess)
        if fits(guess):  # gallop back towards larger patches until one does not fit
            hi, step = guess, 1
            lo = max(0, hi - step)
            while lo > 0 and fits(lo):
                hi, step = lo, step * 2
                lo = max(0, hi - step)
        else:  # gallop on towards smaller patches until one fits
            lo, step = guess, 1
            hi = min(len(chain) - 1, lo + step)
            while not fits(hi):
                if hi == len(chain) - 1:
                    return chain[hi], hi, False
                lo, step = hi, step * 2
                hi = min(len(chain) - 1, lo + step)
        while hi - lo > 1:  # chain[lo] does not fit, chain[hi] does
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid
        return chain[hi], hi, True

    def _topology(self, spacing: Sequence[float], patch: Sequence[float]) -> Topology:
        return compute_topology(spacing, patch, MIN_FEATURE_MAP_SIZE, self.options.max_poolings)

    def _shrink(self, spacing: Sequence[float], topo: Topology, median_shape: Sequence[float]) -> Topology | None:
        """Shrink the axis largest relative to the median image by one pooling multiple (None: cannot).

        No axis is shrunk below ``MIN_PATCH_EDGE`` voxels (a smaller patch cannot hold a useful network).
        """
        dims = len(spacing)
        patch = list(topo.patch_size)
        ratios = [patch[a] / max(float(median_shape[a]), 1e-6) for a in range(dims)]
        # largest ratio first; among equal ratios the last axis first
        for a in sorted(range(dims), key=lambda i: (ratios[i], i), reverse=True):
            # step down by the stride the *smaller* patch will need (never skipping a valid size)
            probe = list(patch)
            probe[a] -= topo.total_stride[a]
            if probe[a] < MIN_PATCH_EDGE:
                continue
            step = self._topology(spacing, probe).total_stride[a]
            new = list(patch)
            new[a] -= step
            if new[a] < MIN_PATCH_EDGE:
                continue
            candidate = self._topology(spacing, new)
            if np.prod(candidate.patch_size, dtype=np.float64) < np.prod(patch, dtype=np.float64):
                return candidate
        return None


def _net_key(net: NetworkPlan) -> dict[str, Any]:
    return {
        "arch": net.arch,
        "patch": list(net.patch_size),
        "batch": net.batch_size,
        "kernels": [list(k) for k in net.kernel_sizes],
        "strides": [list(s) for s in net.strides],
        "features": [net.base_features, net.max_features, net.n_conv_per_stage],
        "norm": net.norm,
        "ds": net.deep_supervision,
        "options": net.options,
        "precision": net.precision,
    }


def arch_options(arch: str) -> dict[str, Any]:
    """Architecture-specific options recorded in the plan (builtins only).

    ``deeplab`` uses output stride 16 (DeepLabv3+'s training setting: the last striding is replaced by
    dilation once the features are 1/16 of the input) and ``psp`` output stride 8 (PSPNet's setting); the
    networks cap it per axis at the topology's total stride. ``unet`` and ``fcn`` take everything from the
    topology.
    """
    if arch == "deeplab":
        return {"output_stride": 16}
    if arch == "psp":
        return {"output_stride": 8}
    return {}


# ---------------------------------------------------------------------------------------------- planning
def _default_estimator() -> MemoryEstimator:
    try:
        from medseg.networks.memory import estimate_training_memory_gb
    except ImportError as exc:  # pragma: no cover - only while the networks package is incomplete
        raise PlanError(f"the memory model medseg.networks.memory is not available ({exc})") from None
    return estimate_training_memory_gb


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
            default :func:`medseg.networks.memory.estimate_training_memory_gb`.

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
    estimator = memory_estimator or _default_estimator()
    num_classes = len(ds.label_ids)
    fitter = _Fitter(options, estimator, ds.num_channels, num_classes)
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

    def make_config(name: str, dims: int, spacing3: tuple[float, ...], median3: np.ndarray, total: float,
                    fixed: dict[str, tuple[NetworkPlan, dict]] | None = None) -> ConfigurationPlan:
        """Plan every arch for one configuration; ``fixed`` holds archs already fitted."""
        nets: dict[str, NetworkPlan] = {}
        cnotes: dict[str, Any] = {"median_shape": [float(v) for v in median3], "total_voxels": total}
        for arch in options.archs:
            if fixed and arch in fixed:
                net, n = fixed[arch]
            elif dims == 3:
                net, n = _fit_3d(fitter, arch, spacing3, median3, total)
            else:
                net, n = fitter.fit(arch, spacing3[1:], median3[1:], total)
            nets[arch] = net
            cnotes[arch] = n
        patch_axes = (0, 1, 2) if dims == 3 else ((0, 1) if is_2d_dataset else (1, 2))
        mirror_axes, cnotes["mirroring"] = plan_mirror_axes(fp, patch_axes, label_names)
        config_notes[name] = cnotes
        default = nets[default_arch]
        return ConfigurationPlan(
            name=name,
            dims=dims,
            spacing=tuple(float(s) for s in spacing3),
            median_shape=tuple(round(float(v)) for v in median3),
            patch_size=default.patch_size,
            batch_size=default.batch_size,
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
            name, [round(s, 4) for s in cfg.spacing], list(cfg.patch_size), cfg.batch_size, net.num_stages,
            net.estimated_memory_gb or float("nan"),
        )
    return plan.validate()


def _transpose_for(spacing: Sequence[float]) -> list[int]:
    """Axis order putting the coarsest axis first (the order nnU-Net plans 3D configurations in)."""
    worst = int(np.argmax(spacing))
    return [worst] + [a for a in range(len(spacing)) if a != worst]


def _fit_3d(
    fitter: _Fitter, arch: str, spacing: Sequence[float], median_shape: Sequence[float], total: float
) -> tuple[NetworkPlan, dict[str, Any]]:
    """Fit a 3D network with the coarsest axis first (tie-breaking as nnU-Net), returned in (Z, Y, X) order."""
    order = _transpose_for(spacing)
    back = [order.index(a) for a in range(3)]
    net, notes = fitter.fit(arch, [spacing[a] for a in order], [median_shape[a] for a in order], total)
    if order == [0, 1, 2]:
        return net, notes

    def un(seq: Sequence) -> tuple:
        return tuple(seq[i] for i in back)

    net = replace(
        net,
        patch_size=un(net.patch_size),
        kernel_sizes=tuple(un(k) for k in net.kernel_sizes),
        strides=tuple(un(s) for s in net.strides),
    )
    for key in ("initial_patch", "first_topology_patch"):
        if isinstance(notes.get(key), list):
            notes[key] = list(un(notes[key]))
    return net, notes


def _plan_lowres(
    fitter: _Fitter,
    arch: str,
    full: ConfigurationPlan,
    median_shape: np.ndarray,
    total_voxels: float,
    notes: dict[str, Any],
) -> tuple[tuple[float, ...], np.ndarray, float, tuple[NetworkPlan, dict]] | None:
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
    fitted: tuple[NetworkPlan, dict] | None = None
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
        fitted = _fit_3d(fitter, arch, tuple(spacing), rounded, total_voxels * low_vox / median_vox_full)
        coverage = float(np.prod(fitted[0].patch_size, dtype=np.float64)) / low_vox
    shrink = median_vox_full / float(np.prod(low_median, dtype=np.float64))
    lnotes.update(steps=steps, spacing=[float(s) for s in spacing], median_shape=[float(v) for v in low_median],
                  image_shrink_factor=round(shrink, 3))
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
