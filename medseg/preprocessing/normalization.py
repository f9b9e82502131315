"""Intensity normalisation per input channel, as the plan's :class:`NormalizationSpec` says."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.errors import PlanError
from medseg.options import NormalizationScheme, valid_values
from medseg.planning.plan import NormalizationSpec

_EPS = 1e-8


def normalize_channel(channel: np.ndarray, spec: NormalizationSpec, mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise one channel.

    Args:
        channel: ``(Z, Y, X)`` raw intensities.
        spec: ``"ct"``: clip to ``[clip_low, clip_high]``, then ``(x - mean) / max(std, 1e-8)`` with the dataset's
            foreground statistics; ``"zscore"``: ``(x - mean) / max(std, 1e-8)`` with this image's statistics,
            computed inside ``mask`` and zero outside it when ``spec.use_nonzero_mask``; ``"none"``: unchanged.
        mask: bool ``(Z, Y, X)`` nonzero region (used by ``zscore`` with ``use_nonzero_mask``).

    Returns:
        float32 ``(Z, Y, X)``.

    Raises:
        PlanError: unknown scheme or a ``ct`` spec without its statistics.
    """
    x = channel.astype(np.float32, copy=True)
    if spec.scheme == NormalizationScheme.NONE:
        return x
    if spec.scheme == NormalizationScheme.CT:
        if spec.clip_low is None or spec.clip_high is None or spec.mean is None or spec.std is None:
            raise PlanError("normalization scheme 'ct' needs clip_low, clip_high, mean and std in the plan")
        np.clip(x, spec.clip_low, spec.clip_high, out=x)
        x -= np.float32(spec.mean)
        x /= np.float32(max(float(spec.std), _EPS))
        return x
    if spec.scheme == NormalizationScheme.ZSCORE:
        if spec.use_nonzero_mask and mask is not None and mask.any() and not mask.all():
            values = x[mask]
            mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
            x -= np.float32(mean)
            x /= np.float32(max(std, _EPS))
            x[~mask] = 0.0
            return x
        mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
        x -= np.float32(mean)
        x /= np.float32(max(std, _EPS))
        return x
    raise PlanError(
        f"unknown normalization scheme {spec.scheme!r}; expected one of {valid_values(NormalizationScheme)}"
    )


def normalize(image: np.ndarray, specs: Sequence[NormalizationSpec], mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise every channel of ``image`` (``(C, Z, Y, X)``) with its spec; returns float32 ``(C, Z, Y, X)``.

    Raises:
        PlanError: the number of specs differs from the number of channels.
    """
    if len(specs) != image.shape[0]:
        raise PlanError(f"the plan has {len(specs)} normalization entries but the image has {image.shape[0]} channels")
    out = np.empty(image.shape, dtype=np.float32)
    for c, spec in enumerate(specs):
        out[c] = normalize_channel(image[c], spec, mask)
    return out
