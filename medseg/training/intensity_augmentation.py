"""Intensity augmentation of training batches: noise, blur, brightness, contrast, low resolution, gamma.

Per batch, vectorised over the samples that draw each transform: :func:`draw_intensity` draws each
sample's transforms (:class:`IntensityParams`) from the sample's ``numpy.random.Generator``, so a batch is
a deterministic function of its samples' seeds; :func:`apply_intensity` applies them to the image channels
after the spatial augmentation (:mod:`medseg.training.augmentation`).

Arrays: batches ``(B, C, *spatial)`` float32, one sample ``(C, *spatial)``; ``spatial`` is ``(Z, Y, X)``
for 3D or ``(Y, X)`` for 2D patches. Blur sigmas are in voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medseg.training.config import AugmentationConfig


@dataclass
class IntensityParams:
    """Per-sample intensity transforms of a batch (None / 1.0 = not applied)."""

    noise_std: list[float | None]
    blur_sigma: list[list[float] | None]
    brightness: list[float]
    contrast: list[float | None]
    lowres_zoom: list[float | None]
    gamma: list[tuple[float, bool] | None]
    gamma_inverted: list[float | None]
    noise_seed: list[int]


def draw_intensity(
    rngs: Sequence[np.random.Generator], aug: AugmentationConfig | None, dims: int
) -> IntensityParams | None:
    """Draw the intensity augmentation of each sample (one generator per sample); None when disabled
    (``aug.enabled`` or ``aug.intensity`` False; an unresolved ``intensity=None`` counts as on)."""
    if aug is None or not aug.enabled or aug.intensity is False:
        return None
    p = IntensityParams([], [], [], [], [], [], [], [])
    for rng in rngs:
        p.noise_std.append(math.sqrt(rng.uniform(*aug.noise_variance)) if rng.random() < aug.p_noise else None)
        p.blur_sigma.append([rng.uniform(*aug.blur_sigma) for _ in range(dims)] if rng.random() < aug.p_blur else None)
        p.brightness.append(rng.uniform(*aug.brightness_range) if rng.random() < aug.p_brightness else 1.0)
        p.contrast.append(rng.uniform(*aug.contrast_range) if rng.random() < aug.p_contrast else None)
        p.lowres_zoom.append(rng.uniform(*aug.lowres_range) if rng.random() < aug.p_lowres else None)
        p.gamma_inverted.append(_draw_gamma(rng, aug.gamma_range) if rng.random() < aug.p_gamma_inverted else None)
        g = _draw_gamma(rng, aug.gamma_range) if rng.random() < aug.p_gamma else None
        p.gamma.append(None if g is None else (g, False))
        p.noise_seed.append(int(rng.integers(2**31)))
    return p


def _draw_gamma(rng: np.random.Generator, r: tuple[float, float]) -> float:
    # half of the draws below 1, half above (as wide a range of darkening as of brightening)
    if r[0] < 1 < r[1] and rng.random() < 0.5:
        return float(rng.uniform(r[0], 1.0))
    return float(rng.uniform(max(r[0], 1.0) if r[1] > 1 else r[0], r[1]))


def gaussian_kernel_1d(sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """Normalised 1D Gaussian of standard deviation ``sigma`` voxels, radius ``ceil(truncate * sigma)``."""
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(C, *spatial)`` with one sigma per spatial axis (reflect padding)."""
    d = x.ndim - 1
    conv = F.conv3d if d == 3 else F.conv2d
    c = x.shape[0]
    out = x.unsqueeze(0)
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        k = gaussian_kernel_1d(sigma)
        r = (k.numel() - 1) // 2
        if r >= x.shape[1 + axis]:  # too short to pad by reflection
            continue
        shape = [1] * d
        shape[axis] = k.numel()
        weight = k.reshape(1, 1, *shape).expand(c, 1, *shape)
        pad = [0, 0] * d
        pad[2 * (d - 1 - axis)] = r
        pad[2 * (d - 1 - axis) + 1] = r
        out = conv(F.pad(out, pad, mode="reflect"), weight, groups=c)
    return out[0]


def apply_intensity(batch: torch.Tensor, p: IntensityParams | None) -> torch.Tensor:
    """Apply drawn intensity transforms to ``batch`` ``(B, C, *spatial)`` float32 (in place where possible).

    Order: noise, blur, brightness, contrast, low resolution, inverted gamma, gamma. Contrast keeps
    each channel within its original value range; gamma restores each channel's mean and standard
    deviation.
    """
    if p is None:
        return batch
    b = batch.shape[0]
    for i in range(b):
        x = batch[i]
        if (noise_std := p.noise_std[i]) is not None and noise_std > 0:
            g = torch.Generator().manual_seed(p.noise_seed[i])
            x.add_(torch.randn(x.shape, generator=g) * noise_std)
        if (blur_sigma := p.blur_sigma[i]) is not None:
            x.copy_(gaussian_blur(x, blur_sigma))
    factors = torch.tensor(p.brightness, dtype=batch.dtype).reshape(b, *([1] * (batch.ndim - 1)))
    if (factors != 1).any():
        batch.mul_(factors)
    for i in range(b):
        x = batch[i]
        if (contrast := p.contrast[i]) is not None:
            axes = tuple(a for a in range(1, x.ndim))
            mean = x.mean(axes, keepdim=True)
            lo = x.amin(axes, keepdim=True)
            hi = x.amax(axes, keepdim=True)
            x.sub_(mean).mul_(contrast).add_(mean)
            torch.maximum(x, lo, out=x)
            torch.minimum(x, hi, out=x)
        if (zoom := p.lowres_zoom[i]) is not None:
            size = x.shape[1:]
            small = [max(1, int(round(s * zoom))) for s in size]
            if list(small) != list(size):
                down = F.interpolate(x.unsqueeze(0), size=small, mode="nearest")
                mode = "trilinear" if len(size) == 3 else "bilinear"
                x.copy_(F.interpolate(down, size=tuple(size), mode=mode, align_corners=False)[0])
        if (gamma_inverted := p.gamma_inverted[i]) is not None:
            x.copy_(-_gamma(-x, gamma_inverted))
        if (gamma := p.gamma[i]) is not None:
            x.copy_(_gamma(x, gamma[0]))
    return batch


def _gamma(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Gamma on ``(C, *spatial)`` rescaled to [0, 1] per channel, keeping each channel's mean and std."""
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axes, keepdim=True)
    std = x.std(axes, keepdim=True)
    lo = x.amin(axes, keepdim=True)
    rng = (x.amax(axes, keepdim=True) - lo).clamp_min(1e-7)
    y = ((x - lo) / rng).clamp_(0, 1).pow_(gamma) * rng + lo
    y_mean = y.mean(axes, keepdim=True)
    y_std = y.std(axes, keepdim=True).clamp_min(1e-7)
    return (y - y_mean) / y_std * std + mean
