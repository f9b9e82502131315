"""Spatial augmentation of training patches, fast on the CPU, and the cascade's previous-stage perturbation.

Spatial augmentation (per sample): scaling, rotation, mirroring and (optionally) elastic deformation are
combined into *one* resampling. A patch is described by its centre in the case's voxel grid and a
``d x d`` matrix ``A`` mapping patch offsets (voxels from the patch centre) to image offsets; only the
image region the transformed patch touches is cut out and resampled with a single ``grid_sample``
(linear for the image, nearest for the labels). Samples without rotation/scaling/deformation are plain
crops plus flips (no interpolation at all).

A cascade's previous-stage channels are further degraded by random morphology
(:func:`perturb_previous_stage`). The intensity part (noise, blur, brightness, contrast, low resolution,
gamma) is :mod:`medseg.training.intensity_augmentation`.

All randomness comes from a ``numpy.random.Generator`` handed in by the caller, so a sample is a
deterministic function of its seed.

Arrays: images ``(C, *spatial)`` float32, labels ``(*spatial)`` integer class indices; ``spatial`` is
``(Z, Y, X)`` for 3D or ``(Y, X)`` for 2D patches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medseg.training.config import AugmentationConfig


@dataclass
class SpatialParams:
    """How one sample's patch is cut out of its case.

    Attributes:
        center: patch centre in the case's voxel grid, ``d`` floats.
        matrix: ``(d, d)`` map from patch offsets to image offsets (rotation / zoom / mirroring); None =
            identity apart from ``flips``.
        flips: axes to mirror (used when ``matrix`` is None).
        elastic_seed: seed of the elastic displacement field (None = no deformation).
        elastic_alpha / elastic_sigma: amplitude and smoothness of the deformation, voxels.
    """

    center: np.ndarray
    matrix: np.ndarray | None = None
    flips: tuple[int, ...] = ()
    elastic_seed: int | None = None
    elastic_alpha: float = 0.0
    elastic_sigma: float = 1.0


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """Rotation in array-axis coordinates.

    Args:
        angles: one angle (radians) for 2D, or three for 3D: rotation around axis 0 (Z, i.e. in the
            Y-X plane), axis 1 (Y) and axis 2 (X), applied in that order.

    Returns:
        ``(d, d)`` orthonormal matrix acting on ``(z, y, x)`` (or ``(y, x)``) column vectors.
    """
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    az, ay, ax = angles
    rz = np.array([[1, 0, 0], [0, math.cos(az), -math.sin(az)], [0, math.sin(az), math.cos(az)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rx = np.array([[math.cos(ax), -math.sin(ax), 0], [math.sin(ax), math.cos(ax), 0], [0, 0, 1]])
    return rx @ ry @ rz


def draw_spatial(
    rng: np.random.Generator,
    center: np.ndarray,
    aug: AugmentationConfig | None,
    dims: int,
    anisotropic: bool,
) -> SpatialParams:
    """Draw the spatial augmentation of one sample.

    Args:
        rng: the sample's random generator.
        center: patch centre in voxels.
        aug: augmentation settings; None or ``enabled=False`` gives a plain crop.
        dims: 2 or 3 spatial dimensions of the patch.
        anisotropic: 3D data whose Z spacing is much coarser: rotate in-plane (around Z) only.
    """
    if aug is None or not aug.enabled:
        return SpatialParams(center=center)
    matrix = np.eye(dims)
    transformed = False
    if rng.random() < aug.p_rotation:
        if dims == 2 or anisotropic:
            a = math.radians(aug.rotation_degrees_inplane)
            angle = rng.uniform(-a, a)
            angles = [angle] if dims == 2 else [angle, 0.0, 0.0]
        else:
            a = math.radians(aug.rotation_degrees)
            angles = list(rng.uniform(-a, a, size=3))
        matrix = rotation_matrix(angles) @ matrix
        transformed = True
    if rng.random() < aug.p_scale:
        zoom = rng.uniform(*aug.scale_range)
        matrix = matrix / zoom  # zoom > 1 enlarges the content: a smaller image region fills the patch
        transformed = True
    axes = range(dims) if aug.mirror_axes is None else [a for a in aug.mirror_axes if a < dims]
    flips = tuple(a for a in axes if rng.random() < 0.5)
    elastic_seed = None
    if rng.random() < aug.p_elastic:
        elastic_seed = int(rng.integers(2**31))
        transformed = True
    if not transformed:
        return SpatialParams(center=center, flips=flips)
    for a in flips:
        matrix[:, a] *= -1
    return SpatialParams(
        center=center,
        matrix=matrix,
        elastic_seed=elastic_seed,
        elastic_alpha=aug.elastic_alpha,
        elastic_sigma=max(aug.elastic_sigma, 1.0),
    )


def _crop_padded(arr: np.ndarray, lo: Sequence[int], hi: Sequence[int], lead: int) -> np.ndarray:
    """``arr[..., lo:hi]`` over the last ``len(lo)`` axes, zero-padded where the box leaves the array."""
    spatial = arr.shape[lead:]
    src = tuple(slice(max(a, 0), min(b, s)) for a, b, s in zip(lo, hi, spatial))
    if all(a >= 0 for a in lo) and all(b <= s for b, s in zip(hi, spatial)):
        return np.asarray(arr[(slice(None),) * lead + src])
    out = np.zeros(arr.shape[:lead] + tuple(b - a for a, b in zip(lo, hi)), dtype=arr.dtype)
    if all(s.stop > s.start for s in src):
        dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))
        out[(slice(None),) * lead + dst] = arr[(slice(None),) * lead + src]
    return out


def _label_np_dtype(seg: np.ndarray) -> np.dtype:
    """Small signed integer type holding the label values (int8 up to 127 classes, else int16/int32)."""
    if seg.dtype in (np.int8, np.int16, np.int32):
        return seg.dtype
    return np.dtype(np.int16) if seg.dtype in (np.uint8,) else np.dtype(np.int32)


def _label_dtype(seg: np.ndarray) -> torch.dtype:
    return {np.dtype(np.int8): torch.int8, np.dtype(np.int16): torch.int16}.get(
        np.dtype(_label_np_dtype(seg)), torch.int32
    )


def _elastic_field(seed: int, patch: Sequence[int], alpha: float, sigma: float) -> torch.Tensor:
    """Smooth random displacement ``(*patch, d)`` in voxels, each component within ``[-alpha, alpha]``."""
    d = len(patch)
    g = torch.Generator().manual_seed(seed)
    coarse = [max(2, int(math.ceil(p / sigma)) + 1) for p in patch]
    field = torch.rand((1, d, *coarse), generator=g) * 2 - 1
    mode = "trilinear" if d == 3 else "bilinear"
    field = F.interpolate(field, size=tuple(patch), mode=mode, align_corners=True)[0] * alpha
    return field.movedim(0, -1)


def extract_patch(
    image: np.ndarray,
    seg: np.ndarray | None,
    params: SpatialParams,
    patch_size: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut one (augmented) patch out of a case.

    Args:
        image: ``(C, *spatial)`` float32 (an in-memory or memory-mapped array).
        seg: ``(*spatial)`` class indices, or None.
        params: from :func:`draw_spatial`.
        patch_size: output patch, ``d`` ints.

    Returns:
        ``(patch (C, *patch_size) float32, labels (*patch_size) or None)``; labels keep a small
        integer type (int8 / int16 / int32, see :func:`_label_np_dtype`); voxels outside the case are 0
        in the image and background in the labels.
    """
    patch = tuple(int(p) for p in patch_size)
    d = len(patch)
    half = np.array([(p - 1) / 2 for p in patch])
    if params.matrix is None:
        lo = [int(v) for v in np.floor(params.center - half + 0.5)]
        hi = [a + p for a, p in zip(lo, patch)]
        img = _crop_padded(image, lo, hi, 1)
        lab = None if seg is None else _crop_padded(seg, lo, hi, 0)
        if params.flips:
            img = np.flip(img, tuple(a + 1 for a in params.flips))
            lab = None if lab is None else np.flip(lab, params.flips)
        img_t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
        lab_t = (
            None
            if lab is None or seg is None
            else torch.from_numpy(np.ascontiguousarray(lab, dtype=_label_np_dtype(seg)))
        )
        return img_t, lab_t

    a = params.matrix
    corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(d, -1)
    mapped = a @ corners
    margin = (params.elastic_alpha if params.elastic_seed is not None else 0.0) + 1.0
    lo = [int(v) for v in np.floor(params.center + mapped.min(1) - margin)]
    hi = [int(v) + 1 for v in np.ceil(params.center + mapped.max(1) + margin)]
    crop = torch.from_numpy(np.ascontiguousarray(_crop_padded(image, lo, hi, 1), dtype=np.float32))
    box = np.array([b - a for a, b in zip(lo, hi)], dtype=np.float64)

    # affine map from the output's normalised coordinates u in [-1, 1] (align_corners=True) to the
    # crop's: v = D (A diag(half) u + c) - 1 with D = diag(2 / (box - 1)); grid_sample wants (x, y[, z])
    scale_in = 2.0 / np.maximum(box - 1, 1)
    lin = scale_in[:, None] * a * half[None, :]
    shift = scale_in * (params.center - np.array(lo)) - 1.0
    theta = np.concatenate([lin[::-1, ::-1], shift[::-1, None]], axis=1)
    theta_t = torch.as_tensor(theta.copy(), dtype=torch.float32).unsqueeze(0)
    grid = F.affine_grid(theta_t, [1, 1, *patch], align_corners=True)
    if params.elastic_seed is not None:
        disp = _elastic_field(params.elastic_seed, patch, params.elastic_alpha, params.elastic_sigma)
        grid = grid + (disp * torch.as_tensor(scale_in, dtype=torch.float32)).flip(-1).unsqueeze(0)
    out = F.grid_sample(crop.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    lab_t = None
    if seg is not None:
        lab_crop = torch.from_numpy(np.ascontiguousarray(_crop_padded(seg, lo, hi, 0))).to(torch.float32)
        lab_t = F.grid_sample(lab_crop[None, None], grid, mode="nearest", padding_mode="zeros", align_corners=True)[
            0, 0
        ]
        lab_t = lab_t.to(_label_dtype(seg))
    return out, lab_t


#: Previous-stage perturbation (cascade training, :func:`perturb_previous_stage`): per one-hot channel, the
#: probability of a random binary morphological operation, of removing one connected component, and the
#: largest structuring-element radius (voxels).
PREVIOUS_STAGE_P_MORPHOLOGY = 0.4
PREVIOUS_STAGE_P_REMOVE_COMPONENT = 0.2
PREVIOUS_STAGE_MAX_RADIUS = 3


def perturb_previous_stage(onehot: torch.Tensor, rng: np.random.Generator) -> None:
    """Degrade a cascade's previous-stage segmentation in place, so the cascade learns to correct it.

    At test time the previous stage makes mistakes its own cross-validated training predictions show only
    some of; as in nnU-Net, each one-hot channel is, with :data:`PREVIOUS_STAGE_P_MORPHOLOGY`, dilated,
    eroded, opened or closed with a ball of radius 1 to :data:`PREVIOUS_STAGE_MAX_RADIUS` voxels, and with
    :data:`PREVIOUS_STAGE_P_REMOVE_COMPONENT` loses one of its connected components, chosen at random. Channels are thresholded at 0.5 first (spatial augmentation interpolates them).

    Args:
        onehot: ``(L, *spatial)`` float one-hot foreground channels of one sample (modified in place).
        rng: the sample's generator.
    """
    for k in range(onehot.shape[0]):
        morph = rng.random() < PREVIOUS_STAGE_P_MORPHOLOGY
        remove = rng.random() < PREVIOUS_STAGE_P_REMOVE_COMPONENT
        if not (morph or remove):
            continue
        mask = onehot[k].numpy() > 0.5
        if morph:
            radius = int(rng.integers(1, PREVIOUS_STAGE_MAX_RADIUS + 1))
            grid = np.indices((2 * radius + 1,) * mask.ndim) - radius
            ball = (grid**2).sum(axis=0) <= radius**2
            op = (ndimage.binary_dilation, ndimage.binary_erosion, ndimage.binary_opening, ndimage.binary_closing)[
                int(rng.integers(4))
            ]
            mask = op(mask, structure=ball)
        if remove and mask.any():
            components, n = ndimage.label(mask)
            mask &= components != int(rng.integers(1, n + 1))
        onehot[k] = torch.from_numpy(mask.astype(np.float32))
