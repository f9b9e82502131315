"""Fully connected CRF over softmax probabilities (DeepLab-style post-processing), in 3D, in torch.

Model (Krahenbuhl & Koltun 2011, "Efficient inference in fully connected CRFs with Gaussian edge potentials";
used as post-processing by DeepLab, Chen et al. 2015): unary ``-log P`` from the network's probabilities, Potts
pairwise terms with two Gaussian kernels,

- spatial: ``exp(-|p_i - p_j|^2 / 2 spatial_mm^2)`` (smoothness),
- bilateral: ``exp(-|p_i - p_j|^2 / 2 bilateral_mm^2 - |I_i - I_j|^2 / 2 bilateral_intensity^2)`` (voxels
  of similar intensity nearby take the same label),

with positions in mm (spacing-aware) and intensities in units of the image's standard deviation (the
first channel). Mean-field inference for ``iterations`` steps::

    Q <- softmax_k( log P + spatial_weight * S(Q) + bilateral_weight * B(Q) )

where ``S(Q)`` / ``B(Q)`` are each kernel's *normalised* filtering of ``Q`` (a kernel-weighted average of the
neighbours' label probabilities, in [0, 1]; the voxel itself is included), so a weight is the largest
log-odds shift a kernel can make. The spatial kernel is an exact separable Gaussian blur. The bilateral kernel
is approximated on a bilateral grid (Paris & Durand 2006): ``Q`` is splatted onto a grid downsampled in space
(cells of about ``bilateral_mm / 2``) with linear weights along the intensity axis (bins of
``bilateral_intensity / 2``), blurred there with a separable Gaussian, and sliced back with trilinear
interpolation. Cost per iteration is O(N * (K + 1) * bins); about 0.1-0.5 s per iteration on a hippocampus
case and a few seconds on a 30 x 256 x 256 volume on 2 loaded CPU cores (see docs/postprocessing.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medseg.errors import MedsegError

__all__ = ["CrfParams", "crf_labels", "dense_crf"]

_MAX_BINS = 24
_EPS = 1e-6


@dataclass(frozen=True)
class CrfParams:
    """Settings of :func:`dense_crf`.

    Attributes:
        bilateral_weight: weight of the bilateral (appearance) kernel, log-odds units.
        bilateral_mm: spatial standard deviation of the bilateral kernel, mm.
        bilateral_intensity: intensity standard deviation of the bilateral kernel, in image standard deviations.
        spatial_weight: weight of the spatial (smoothness) kernel, log-odds units.
        spatial_mm: standard deviation of the spatial kernel, mm.
        iterations: mean-field iterations (bounded: 1..20).
    """

    bilateral_weight: float = 1.0
    bilateral_mm: float = 3.0
    bilateral_intensity: float = 0.5
    spatial_weight: float = 0.5
    spatial_mm: float = 1.0
    iterations: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.iterations <= 20:
            raise MedsegError(f"CRF iterations must be 1..20, got {self.iterations}")
        if min(self.bilateral_mm, self.bilateral_intensity, self.spatial_mm) <= 0:
            raise MedsegError("CRF kernel widths must be positive")
        if min(self.bilateral_weight, self.spatial_weight) < 0:
            raise MedsegError("CRF weights must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CrfParams:
        """Inverse of :meth:`to_dict`.

        Raises:
            MedsegError: unknown keys or invalid values.
        """
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise MedsegError(f"CRF settings: unknown keys {sorted(unknown)}")
        values: dict[str, Any] = {k: (int(v) if k == "iterations" else float(v)) for k, v in d.items()}
        return cls(**values)


def _gaussian_taps(sigma: float) -> torch.Tensor:
    """1D Gaussian kernel (sum 1) of standard deviation ``sigma`` samples."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _binomial_pass(t: torch.Tensor, axis: int) -> torch.Tensor:
    """One ``[1, 2, 1] / 4`` filter pass along ``axis`` (zero padding): variance 1/2 sample^2."""
    n = t.shape[axis]
    out = t * 0.5
    if n > 1:
        out.narrow(axis, 1, n - 1).add_(t.narrow(axis, 0, n - 1), alpha=0.25)
        out.narrow(axis, 0, n - 1).add_(t.narrow(axis, 1, n - 1), alpha=0.25)
    return out


def _blur(t: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur (zero padding) of ``t`` ``(C, *S)`` along each axis of ``S``; ``sigmas`` in samples.

    A small sigma is ``round(2 sigma^2)`` binomial passes (a Gaussian's variance adds up; memory-bound and
    fast on a CPU), a sigma above 2 samples a convolution with sampled Gaussian taps; below about 0.4 samples
    an axis is left alone.
    """
    for axis, sigma in enumerate(sigmas, start=1):
        passes = round(2 * sigma * sigma)
        if passes == 0:
            continue
        if passes <= 8:
            for _ in range(passes):
                t = _binomial_pass(t, axis)
            continue
        taps = _gaussian_taps(sigma)
        moved = t.movedim(axis, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        out = F.conv1d(flat, taps.view(1, 1, -1), padding=taps.numel() // 2)
        t = out.reshape(shape).movedim(-1, axis)
    return t


class _BilateralGrid:
    """Normalised bilateral filtering of ``(K, Z, Y, X)`` maps for one image (see the module docstring).

    The grid has one cell per ``bilateral_mm`` (at least one voxel) along each axis and one bin per
    ``bilateral_intensity`` standard deviations (at most ``_MAX_BINS``), so its Gaussian has a standard
    deviation of about one cell and one bin. Splatting is a box sum in space and linear between the two nearest
    bins (``index_add_``); slicing is trilinear in space (``grid_sample`` on the bins stacked along ``z``, each
    padded by one replicated cell) and linear between the two bins.
    """

    def __init__(self, image: torch.Tensor, spacing: Sequence[float], params: CrfParams) -> None:
        shape = tuple(image.shape)
        factor = [max(1, int(params.bilateral_mm / s)) for s in spacing]
        self.cells = [math.ceil(n / f) for n, f in zip(shape, factor)]
        self.sigma_cells = [params.bilateral_mm / (f * s) for f, s in zip(factor, spacing)]
        flat = image.flatten()
        std = float(flat.std()) or 1.0
        lo, hi = torch.quantile(flat[:: max(1, flat.numel() // 100000)], torch.tensor([0.005, 0.995])).tolist()
        width = params.bilateral_intensity * std
        bins = int((hi - lo) / width) + 2
        if bins > _MAX_BINS:  # a very wide range: coarser bins, the same kernel width in intensity
            width, bins = (hi - lo) / (_MAX_BINS - 2), _MAX_BINS
        self.bins, self.sigma_bins = bins, params.bilateral_intensity * std / width
        coord = ((image.clamp(lo, hi) - lo) / width).clamp(0, bins - 1 - 1e-4).flatten()
        low = coord.floor().to(torch.int64)
        self.weight_high = coord - low
        gz, gy, gx = self.cells
        axes = [torch.arange(n, dtype=torch.float32) for n in shape]
        zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
        cell = [(u // f).to(torch.int64).flatten() for u, f in zip((zz, yy, xx), factor)]
        self.index_low = low * (gz * gy * gx) + (cell[0] * gy + cell[1]) * gx + cell[2]
        # sample points: voxel u lies at cell coordinate (u - (f - 1) / 2) / f; bins are stacked along z
        pos = [((u - (f - 1) / 2) / f).flatten() for u, f in zip((zz, yy, xx), factor)]
        depth = bins * (gz + 2)

        def norm(c: torch.Tensor, n: int) -> torch.Tensor:
            return 2 * c / (n - 1) - 1 if n > 1 else torch.zeros_like(c)

        self.samples = []
        for b in (low, low + 1):
            z = b.to(torch.float32) * (gz + 2) + 1 + pos[0]
            grid = torch.stack([norm(pos[2], gx), norm(pos[1], gy), norm(z, depth)], dim=-1)
            self.samples.append(grid.view(1, 1, 1, -1, 3))

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        k, shape = q.shape[0], q.shape[1:]
        homog = torch.cat([q, torch.ones_like(q[:1])]).flatten(1)  # (K + 1, N): the last channel normalises
        gz, gy, gx = self.cells
        grid = torch.zeros(k + 1, self.bins * gz * gy * gx)
        grid.index_add_(1, self.index_low, homog * (1 - self.weight_high))
        grid.index_add_(1, self.index_low + gz * gy * gx, homog * self.weight_high)
        grid = _blur(grid.view(k + 1, self.bins, gz, gy, gx), [self.sigma_bins, *self.sigma_cells])
        grid = F.pad(grid, (0, 0, 0, 0, 1, 1), mode="replicate").reshape(1, k + 1, -1, gy, gx)
        low, high = (
            F.grid_sample(grid, s, mode="bilinear", padding_mode="border", align_corners=True).view(k + 1, -1)
            for s in self.samples
        )
        out = low * (1 - self.weight_high) + high * self.weight_high
        return (out[:k] / out[k:].clamp_min(_EPS)).view(k, *shape)


def dense_crf(
    probabilities: np.ndarray, image: np.ndarray, spacing: Sequence[float], params: CrfParams | None = None
) -> np.ndarray:
    """Mean-field marginals of the fully connected CRF (see the module docstring).

    Args:
        probabilities: softmax probabilities ``(K, Z, Y, X)`` (or ``(K, Y, X)``), summing to 1 over ``K``.
        image: intensities ``(Z, Y, X)`` (or ``(Y, X)``), any units (the first channel of the input).
        spacing: voxel size in mm, the image's axis order.
        params: settings (default :class:`CrfParams`).

    Returns:
        float32 marginals ``(K, Z, Y, X)``, same shape as ``probabilities``.

    Raises:
        MedsegError: shapes or spacing do not fit.
    """
    params = params or CrfParams()
    if probabilities.shape[1:] != image.shape or len(spacing) != image.ndim:
        raise MedsegError(
            f"CRF: probabilities {list(probabilities.shape)}, image {list(image.shape)} and spacing "
            f"{list(spacing)} do not fit"
        )
    squeeze = image.ndim == 2
    probs = torch.as_tensor(np.asarray(probabilities, dtype=np.float32))
    img = torch.as_tensor(np.asarray(image, dtype=np.float32))
    spacing = [float(s) for s in spacing]
    if squeeze:  # a 2D slice: one plane with a large spacing, so no kernel reaches across it
        probs, img, spacing = probs[:, None], img[None], [1e6, *spacing]
    with torch.no_grad():
        unary = probs.clamp_min(_EPS).log()
        bilateral = _BilateralGrid(img, spacing, params) if params.bilateral_weight > 0 else None
        spatial_sigmas = [params.spatial_mm / s for s in spacing]
        ones_blur = _blur(torch.ones_like(img)[None], spatial_sigmas).clamp_min(_EPS)
        q = probs
        for _ in range(params.iterations):
            energy = unary.clone()
            if params.spatial_weight > 0:
                energy += params.spatial_weight * (_blur(q, spatial_sigmas) / ones_blur)
            if bilateral is not None:
                energy += params.bilateral_weight * bilateral(q)
            q = torch.softmax(energy, dim=0)
    out = q[:, 0] if squeeze else q
    return out.numpy().astype(np.float32, copy=False)


def crf_labels(
    probabilities: np.ndarray,
    image: np.ndarray,
    spacing: Sequence[float],
    label_ids: Sequence[int],
    params: CrfParams | None = None,
) -> np.ndarray:
    """Label map after the CRF: original label ids ``(Z, Y, X)`` (int32) of the argmax of :func:`dense_crf`.

    Args:
        probabilities, image, spacing, params: as in :func:`dense_crf`.
        label_ids: original label id of each class index (background first).
    """
    marginals = dense_crf(probabilities, image, spacing, params)
    return np.asarray(label_ids, dtype=np.int32)[marginals.argmax(0)]
