"""The preprocessing rules of a plan: target spacing and intensity normalisation (nnU-Net's rules).

1. **Target spacing**: per-axis median of the case spacings. When the coarsest axis is more than 3x coarser
   than the other axes *and* short (its median length x 3 < the shortest other axis), its 10th percentile
   spacing is used instead (never finer than the other axes), to avoid interpolating thick slices.
2. **Normalisation**: channels named ``CT`` are clipped to the foreground 0.5/99.5 percentiles and z-scored
   with the foreground mean/std of the whole dataset; ``noNorm`` channels are left alone; every other
   channel is z-scored per image, inside the nonzero mask when cropping to the nonzero region removed at
   least a quarter of the median image.

Configurations sharing spacing and normalisation share their preprocessed data (:func:`data_identifier`).
Every shape and spacing is in array order ``(Z, Y, X)``, spacing in mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import PlanError
from medseg.options import NormalizationScheme
from medseg.planning.plan import NormalizationSpec

if TYPE_CHECKING:
    from medseg.fingerprint import Fingerprint

ANISOTROPY_THRESHOLD = 3.0
NONZERO_MASK_THRESHOLD = 0.75  # use the nonzero mask when cropping keeps less than this fraction


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
    out: np.ndarray = np.round(spacings / np.asarray(target, dtype=np.float64) * shapes)
    return out


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
                    scheme=NormalizationScheme.CT,
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
            specs.append(NormalizationSpec(scheme=NormalizationScheme.NONE))
            notes.append(f"channel {c} ({name}): no normalisation (channel name {name!r})")
        else:
            specs.append(NormalizationSpec(scheme=NormalizationScheme.ZSCORE, use_nonzero_mask=use_mask))
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
