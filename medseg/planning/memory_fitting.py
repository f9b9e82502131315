"""Fit a configuration's network, patch and batch to the memory budget (nnU-Net's rule, measured memory).

**Patch and batch**: start from a patch with the aspect ratio of ``1/spacing`` and the volume of
256^3 (3D) / 2048^2 (2D) voxels, capped at the median image; derive the topology
(:mod:`medseg.planning.topology`, then the nearest one the architecture accepts: MONAI's networks take fewer
layouts, :func:`medseg.networks.accepted_spec`); while one training step at batch 2 needs more than the memory budget,
shrink the axis that is largest relative to the median image by one pooling multiple. Then the batch
is the largest that fits the budget, but at most what covers 5% of the dataset's voxels, and at least 2.

3D networks are fitted with the coarsest axis first (nnU-Net's axis order, which decides its tie-breaking)
and returned in ``(Z, Y, X)`` order (:func:`fit_3d`); 2D patches are ``(Y, X)``, spacing in mm.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from medseg.errors import PlanError
from medseg.networks.registry import accepted_spec, topology_problems
from medseg.networks.spec import NetworkSpec
from medseg.planning.plan import NetworkPlan
from medseg.planning.planner_options import PlannerOptions
from medseg.planning.topology import MIN_FEATURE_MAP_SIZE, Topology, compute_topology, round_up

logger = logging.getLogger(__name__)

#: (net, in_channels, num_classes) -> GB needed by one training step at ``net.batch_size``.
MemoryEstimator = Callable[[NetworkPlan, int, int], float]

#: A median image shape, one (possibly fractional) size per axis: a sequence, or the planner's 1-D array.
MedianShape = Sequence[float] | np.ndarray

MAX_DATASET_COVERED = 0.05  # one batch sees at most this fraction of the dataset's voxels
MIN_BATCH_SIZE = 2
MIN_PATCH_EDGE = 2 * MIN_FEATURE_MAP_SIZE  # the memory fitting never shrinks a patch axis below this
REFERENCE_PATCH_VOXELS = {3: 256**3, 2: 2048**2}
DEFAULT_MAX_FEATURES = {3: 320, 2: 512}


class Fitter:
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
        spec = accepted_spec(
            NetworkSpec(
                arch=arch,
                kernel_sizes=topo.kernel_sizes,
                strides=topo.strides,
                base_features=self.options.base_features,
                max_features=max(self.max_features(dims), self.options.base_features),
                options=arch_options(arch),
            )
        )
        return NetworkPlan(spec, patch_size=topo.patch_size, batch_size=batch, precision=self.options.precision)

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
        self, arch: str, spacing: Sequence[float], median_shape: MedianShape, total_voxels: float
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
        topo = self._topology(arch, spacing, initial)
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
                    arch,
                    list(topo.patch_size),
                    est,
                    budget,
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
        self, arch: str, spacing: Sequence[float], topo: Topology, median_shape: MedianShape, est0: float
    ) -> tuple[Topology, int, bool]:
        """The first patch of the shrinking chain that fits at batch 2, its index, and whether it fits.

        The shrinking rule visits a fixed chain of ever smaller patches whose memory falls
        along the chain, so the first one that fits is found without estimating every link: guess it from
        memory roughly proportional to patch voxels, then gallop and bisect with real estimates. The result
        is the one a step-by-step walk would give.
        """
        budget = self.options.gpu_memory_gb
        chain = [topo]
        while (smaller := self._shrink(arch, spacing, chain[-1], median_shape)) is not None:
            chain.append(smaller)
        if len(chain) == 1:
            return topo, 0, False

        def fits(i: int) -> bool:
            return (
                i == 0
                and est0 <= budget
                or i > 0
                and self.estimate(self.network(arch, chain[i], MIN_BATCH_SIZE)) <= budget
            )

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

    def _topology(self, arch: str, spacing: Sequence[float], patch: Sequence[float]) -> Topology:
        """The planned topology for ``patch``, as ``arch`` accepts it (:func:`medseg.networks.accepted_spec`: e.g.
        fewer stages, or a fixed layout), the patch rounded up to its total stride."""
        topo = compute_topology(spacing, patch, MIN_FEATURE_MAP_SIZE, self.options.max_poolings)
        spec = self.network(arch, topo, MIN_BATCH_SIZE).spec
        if spec.strides == topo.strides and spec.kernel_sizes == topo.kernel_sizes:
            return topo
        total = spec.total_stride()
        rounded = tuple(round_up(p, t) for p, t in zip(patch, total))
        return Topology(patch_size=rounded, kernel_sizes=spec.kernel_sizes, strides=spec.strides)

    def _shrink(
        self, arch: str, spacing: Sequence[float], topo: Topology, median_shape: MedianShape
    ) -> Topology | None:
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
            step = self._topology(arch, spacing, probe).total_stride[a]
            new = list(patch)
            new[a] -= step
            if new[a] < MIN_PATCH_EDGE:
                continue
            candidate = self._topology(arch, spacing, new)
            refused = topology_problems(self.network(arch, candidate, MIN_BATCH_SIZE).spec, candidate.patch_size, "")
            if not refused and np.prod(candidate.patch_size, dtype=np.float64) < np.prod(patch, dtype=np.float64):
                return candidate
        return None


def _net_key(net: NetworkPlan) -> dict[str, Any]:
    spec = net.spec
    return {
        "arch": net.arch,
        "patch": list(net.patch_size),
        "batch": net.batch_size,
        "kernels": [list(k) for k in spec.kernel_sizes],
        "strides": [list(s) for s in spec.strides],
        "features": [spec.base_features, spec.max_features, spec.n_conv_per_stage],
        "norm": spec.norm,
        "ds": spec.deep_supervision,
        "options": spec.options,
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


def _transpose_for(spacing: Sequence[float]) -> list[int]:
    """Axis order putting the coarsest axis first (the order nnU-Net plans 3D configurations in)."""
    worst = int(np.argmax(spacing))
    return [worst] + [a for a in range(len(spacing)) if a != worst]


def fit_3d(
    fitter: Fitter, arch: str, spacing: Sequence[float], median_shape: MedianShape, total: float
) -> tuple[NetworkPlan, dict[str, Any]]:
    """Fit a 3D network with the coarsest axis first (tie-breaking as nnU-Net), returned in (Z, Y, X) order."""
    order = _transpose_for(spacing)
    back = [order.index(a) for a in range(3)]
    net, notes = fitter.fit(arch, [spacing[a] for a in order], [median_shape[a] for a in order], total)
    if order == [0, 1, 2]:
        return net, notes

    def un(seq: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(seq[i] for i in back)

    spec = replace(
        net.spec,
        kernel_sizes=tuple(un(k) for k in net.spec.kernel_sizes),
        strides=tuple(un(s) for s in net.spec.strides),
    )
    net = replace(net, spec=spec, patch_size=un(net.patch_size))
    for key in ("initial_patch", "first_topology_patch"):
        if isinstance(notes.get(key), list):
            notes[key] = list(un(notes[key]))
    return net, notes
