"""The candidate grid of the time-budget fit (:mod:`medseg.planning.budget`): which networks, patches and
batches are tried.

**Candidates** (:func:`default_candidates`), all with the planned topology (same kernels and strides):

* ``base_features`` in :data:`FEATURE_GRID` (16, 24, 32; the nearest widths an architecture accepts,
  :func:`candidate_widths`); ``max_features`` scaled by the same factor as
  the base (the planned 32/320 becomes 16/160);
* the planned patch; when it does not cover the median image (large images) also up to
  :data:`MAX_PATCH_HALVINGS` smaller patches, each halving the largest axis (rounded to the total
  stride, keeping a bottleneck of at least :data:`MIN_BOTTLENECK` voxels);
* batch sizes :data:`BATCH_GRID` (2 and 4 for 3D; never below 2).

A grid (the default one or one given) is checked against the planned topology (:func:`check_candidates`); for
a CUDA fit the candidates whose training step would not fit the GPU memory budget are dropped before any is
measured (:func:`filter_by_memory`, with the estimate of :mod:`medseg.planning.memory`).

Patch sizes are ``(Z, Y, X)`` (``(Y, X)`` for 2D).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from medseg.errors import PlanError
from medseg.networks.registry import accepted_spec
from medseg.options import DeviceKind, Precision
from medseg.planning.memory import estimate_training_memory_gb
from medseg.planning.plan import NetworkPlan

#: Widths tried (channels of the first stage).
FEATURE_GRID = (16, 24, 32)
#: Batch sizes tried, per number of spatial dimensions (never below 2: instance norm and the foreground
#: oversampling need two samples per batch).
BATCH_GRID = {3: (2, 4), 2: (16, 32)}
#: For images the planned patch does not cover: how many times the largest patch axis is halved.
MAX_PATCH_HALVINGS = 2
#: A halved patch axis keeps at least this many voxels at the bottleneck (patch / total stride).
MIN_BOTTLENECK = 2


@dataclass(frozen=True)
class Candidate:
    """One point of the grid: width, patch and batch (topology and options come from the planned network).

    Attributes:
        base_features: channels of the first stage.
        max_features: cap on channels per stage.
        patch_size: training patch ``(Z, Y, X)`` or ``(Y, X)``; divisible by the planned total stride.
        batch_size: training batch size.
    """

    base_features: int
    max_features: int
    patch_size: tuple[int, ...]
    batch_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(v) for v in self.patch_size))

    @property
    def patch_voxels(self) -> int:
        return math.prod(self.patch_size)

    @property
    def score(self) -> int:
        """Capacity x context: ``base_features * patch voxels``."""
        return self.base_features * self.patch_voxels

    @property
    def cost(self) -> int:
        """Proxy of the work of one step (for ordering only): ``base_features * patch voxels * batch``."""
        return self.score * self.batch_size

    @property
    def label(self) -> str:
        return f"{self.base_features}f {'x'.join(map(str, self.patch_size))} b{self.batch_size}"

    def dominates(self, other: Candidate) -> bool:
        """True when ``self`` is no more expensive than ``other`` in every respect at the same batch."""
        return (
            self != other
            and self.batch_size == other.batch_size
            and self.base_features <= other.base_features
            and self.max_features <= other.max_features
            and len(self.patch_size) == len(other.patch_size)
            and all(a <= b for a, b in zip(self.patch_size, other.patch_size))
        )

    def network(self, template: NetworkPlan, precision: str) -> NetworkPlan:
        """``template`` (topology, norm, options) with this candidate's width, patch, batch and precision."""
        return replace(
            template,
            spec=replace(template.spec, base_features=self.base_features, max_features=self.max_features),
            patch_size=tuple(self.patch_size),
            batch_size=self.batch_size,
            precision=precision,
            estimated_memory_gb=None,
        )


def scaled_max_features(template: NetworkPlan, base_features: int) -> int:
    """``template.max_features`` scaled by ``base_features / template.base_features`` (at least the base)."""
    spec = template.spec
    return max(base_features, int(round(spec.max_features * base_features / spec.base_features)))


def smaller_patches(net: NetworkPlan, median_shape: Sequence[float]) -> list[tuple[int, ...]]:
    """The planned patch, then up to :data:`MAX_PATCH_HALVINGS` halvings when it does not cover the image.

    Args:
        net: planned network (patch and strides).
        median_shape: median preprocessed image shape of the configuration, same axes as the patch
            (``(Z, Y, X)``, or ``(Y, X)`` for 2D).

    Returns:
        Patches ``(Z, Y, X)``/``(Y, X)``, largest first, each divisible by ``net.total_stride()``. Only the
        planned patch when it already covers the median image on every axis. Each halving takes the
        largest axis (in voxels) that can be halved to a multiple of the total stride keeping
        :data:`MIN_BOTTLENECK` voxels at the bottleneck.
    """
    patches = [tuple(int(p) for p in net.patch_size)]
    if all(p >= m for p, m in zip(net.patch_size, median_shape)):
        return patches
    ts = net.total_stride()
    for _ in range(MAX_PATCH_HALVINGS):
        cur = patches[-1]
        options = []
        for a in range(len(cur)):
            new = (cur[a] // 2) // ts[a] * ts[a]
            if new >= MIN_BOTTLENECK * ts[a] and new < cur[a]:
                options.append((cur[a], a, new))
        if not options:
            break
        _, axis, new = max(options)
        patches.append(tuple(new if i == axis else v for i, v in enumerate(cur)))
    return patches


def default_candidates(net: NetworkPlan, median_shape: Sequence[float]) -> list[Candidate]:
    """The documented grid for one planned network (see the module docstring).

    Args:
        net: the configuration's planned default network.
        median_shape: median preprocessed image shape, same axes as ``net.patch_size``.

    Returns:
        Candidates ordered by width, patch (largest first) and batch.
    """
    batches = BATCH_GRID[net.dims]
    return [
        Candidate(f, scaled_max_features(net, f), patch, b)
        for f in candidate_widths(net)
        for patch in smaller_patches(net, median_shape)
        for b in batches
    ]


def candidate_widths(net: NetworkPlan) -> list[int]:
    """:data:`FEATURE_GRID` as the architecture accepts it (:func:`medseg.networks.accepted_spec`; e.g. SwinUNETR's
    multiples of 12: 12, 24, 36), without duplicates, in increasing order."""
    widths = {
        accepted_spec(replace(net.spec, base_features=f, max_features=max(f, net.spec.max_features))).base_features
        for f in FEATURE_GRID
    }
    return sorted(widths)


def check_candidates(grid: Sequence[Candidate], template: NetworkPlan) -> None:
    """Check that every candidate makes a valid network of ``template``'s topology, without duplicates.

    Raises:
        PlanError: an empty grid, a candidate whose network is invalid (e.g. a patch not divisible by the
            total stride), or duplicates.
    """
    if not grid:
        raise PlanError("no budget candidates given")
    problems = []
    for c in grid:
        net = c.network(template, template.precision)
        problems += net.check(f"candidate {c.label}")
    if len(set(grid)) != len(grid):
        problems.append("candidates contain duplicates")
    if problems:
        raise PlanError("invalid budget candidates:\n" + "\n".join(f"  - {p}" for p in problems))


def filter_by_memory(
    grid: list[Candidate], template: NetworkPlan, gpu_memory_gb: float, cin: int, k: int
) -> tuple[list[Candidate], dict[Candidate, str]]:
    """Drop candidates whose training step would not fit the plan's GPU memory budget (at fp16).

    Returns:
        ``(kept candidates, {dropped candidate: why})``.
    """
    keep, excluded = [], {}
    for c in grid:
        gb = network_memory_gb(c.network(template, Precision.FP16), cin, k, DeviceKind.CUDA)
        if gb is not None and gb > gpu_memory_gb:
            excluded[c] = f"excluded: needs ~{gb:.2f} GB > the {gpu_memory_gb:g} GB GPU memory budget"
        else:
            keep.append(c)
    return keep, excluded


def network_memory_gb(net: NetworkPlan, cin: int, k: int, device: str) -> float | None:
    """Estimated training memory of ``net`` on ``device`` in GB, rounded to 4 decimals."""
    try:
        return round(float(estimate_training_memory_gb(net, cin, k, device=device)), 4)
    except TypeError:  # an estimator without the device argument
        return round(float(estimate_training_memory_gb(net, cin, k)), 4)


__all__ = [
    "BATCH_GRID",
    "FEATURE_GRID",
    "Candidate",
    "candidate_widths",
    "check_candidates",
    "default_candidates",
    "filter_by_memory",
    "network_memory_gb",
    "scaled_max_features",
    "smaller_patches",
]
