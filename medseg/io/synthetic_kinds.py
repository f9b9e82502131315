"""Synthetic look-alikes of dataset kinds medseg must handle beyond the basic synthetic set.

* :func:`generate_tumour_dataset`: brain-tumour-like volumes (BraTS-style, 155x240x240 at 1 mm by
  default) with four sub-regions (necrosis, edema, non-enhancing, enhancing) at random positions inside a
  brain-shaped body, so no class has a fixed side; one to four MRI-like channels written in the nnU-Net
  v2 layout (``imagesTr/CASE_0000.nii.gz`` ...).
* :func:`generate_anisotropic_dataset`: thick-slice volumes (6.5 x 0.78 x 0.78 mm by default), the
  basic synthetic set of :mod:`medseg.io.synthetic` with another geometry.

They feed the end-to-end tests and ``scripts/bench_datasets.py``. Everything is deterministic given the
seed; existing files of another dataset are never overwritten.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from medseg.io.image import atomic_write_text
from medseg.io.synthetic import (
    _case_geometry,
    _centred_coords,
    _check_sizes,
    _start_dataset,
    _write_case,
    generate_synthetic_dataset,
)

logger = logging.getLogger(__name__)

TUMOUR_DATASET_NAME = "MedsegSyntheticTumour"
TUMOUR_LABELS = {"background": 0, "necrosis": 1, "edema": 2, "non_enhancing": 3, "enhancing": 4}
TUMOUR_CHANNELS = ("T1", "T1ce", "T2", "FLAIR")
#: Mean intensity per channel (rows) of brain, necrosis, edema, non-enhancing, enhancing (columns).
_CONTRAST = np.array(
    [
        [100.0, 60.0, 80.0, 90.0, 95.0],  # T1: lesion darker than brain
        [100.0, 50.0, 90.0, 85.0, 220.0],  # T1ce: enhancing rim bright
        [100.0, 230.0, 190.0, 150.0, 140.0],  # T2: fluid and edema bright
        [100.0, 70.0, 210.0, 160.0, 150.0],  # FLAIR: edema bright, necrosis dark
    ]
)
_NOISE_STD = 10.0


def _blob(
    coords: tuple[np.ndarray, ...], center: np.ndarray, radius: float, rng: np.random.Generator, lobes: int = 3
) -> np.ndarray:
    """An irregular blob: the union of ``lobes`` ellipsoids of about ``radius`` mm around ``center``."""
    mask = np.zeros(np.broadcast_shapes(*(c.shape for c in coords)), dtype=bool)
    for _ in range(lobes):
        c = center + rng.normal(0.0, 0.3 * radius, size=3)
        r = radius * rng.uniform(0.6, 1.0, size=3)
        mask |= sum(((x - m) / s) ** 2 for x, m, s in zip(coords, c, r)) <= 1.0
    return mask


def _tumour_case(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...], num_channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """One case: images float32 ``(C, Z, Y, X)`` and a label ``(Z, Y, X)`` with ids 0-4."""
    coords, extent = _centred_coords(shape, spacing)
    brain_r = extent * rng.uniform(0.38, 0.44, size=3)
    brain = sum((x / r) ** 2 for x, r in zip(coords, brain_r)) <= 1.0
    # the lesion centre anywhere in the inner half of the brain: every side equally likely
    size = float(min(brain_r))
    centre = rng.uniform(-0.5, 0.5, size=3) * (brain_r - 0.45 * size)
    edema = _blob(coords, centre, 0.40 * size, rng, lobes=4)
    core_r = 0.28 * size
    core = _blob(coords, centre + rng.normal(0.0, 0.05 * size, size=3), core_r, rng, lobes=2)
    necrosis = _blob(coords, centre + rng.normal(0.0, 0.04 * size, size=3), 0.16 * size, rng, lobes=2) & core
    # non-enhancing part: a lobe of the core on a random side
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    non_enh = _blob(coords, centre + direction * 0.7 * core_r, 0.5 * core_r, rng, lobes=1) & (core | edema) & ~necrosis
    label = np.zeros(shape, dtype=np.uint8)
    label[edema & brain] = TUMOUR_LABELS["edema"]
    label[core & brain] = TUMOUR_LABELS["enhancing"]
    label[non_enh & brain] = TUMOUR_LABELS["non_enhancing"]
    label[necrosis & brain] = TUMOUR_LABELS["necrosis"]

    norm = [c / (e / 2.0) for c, e in zip(coords, extent)]
    images = np.zeros((num_channels, *shape), dtype=np.float32)
    region = np.where(brain, label.astype(np.int64) + 1, 0)  # 0 outside, 1 brain, 2.. lesion classes
    for ch in range(num_channels):
        lut = np.concatenate([[0.0], _CONTRAST[ch] * rng.uniform(0.9, 1.1, size=5)])
        bias = np.exp(sum(rng.uniform(-0.12, 0.12) * n for n in norm))
        scale = rng.uniform(0.5, 3.0)  # scanner-dependent intensity scale
        img = (lut[region] * bias + rng.normal(0.0, _NOISE_STD, size=shape)) * scale
        images[ch] = np.where(brain, np.maximum(img, 1.0), 0.0)
    return images, label


def generate_tumour_dataset(
    out_dir: str | Path,
    num_cases: int = 6,
    seed: int = 0,
    shape: tuple[int, int, int] = (155, 240, 240),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    num_channels: int = 4,
) -> Path:
    """Write a brain-tumour-like dataset in the nnU-Net v2 layout into ``out_dir``.

    Args:
        out_dir: dataset root; created if needed. Another dataset there is refused.
        num_cases: number of cases, ``tumour_000``, ``tumour_001``, ...
        seed: random seed; the same seed gives identical files.
        shape: image shape ``(Z, Y, X)`` (the same for every case, as in BraTS).
        spacing: voxel spacing in mm, ``(Z, Y, X)``.
        num_channels: 1-4 of T1, T1ce, T2, FLAIR, one file per channel.

    Returns:
        The dataset root.

    Raises:
        MedsegError: ``out_dir`` holds another dataset.
        ValueError: invalid arguments.
    """
    out = Path(out_dir)
    _check_sizes(num_cases, shape, spacing, min_size=16)
    if not 1 <= num_channels <= len(TUMOUR_CHANNELS):
        raise ValueError(f"num_channels must be 1-{len(TUMOUR_CHANNELS)}, got {num_channels}")
    json_path = _start_dataset(out, TUMOUR_DATASET_NAME)
    for i in range(num_cases):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i, 4])
        images, label = _tumour_case(rng, tuple(int(s) for s in shape), tuple(float(s) for s in spacing), num_channels)
        geometry = _case_geometry(rng, shape, spacing)
        _write_case(out, f"tumour_{i:03d}", [images[ch] for ch in range(num_channels)], label, geometry)
    meta = {
        "name": TUMOUR_DATASET_NAME,
        "description": "Synthetic brain-tumour-like volumes with four sub-regions (medseg.io.synthetic_kinds)",
        "channel_names": {str(c): TUMOUR_CHANNELS[c] for c in range(num_channels)},
        "labels": dict(TUMOUR_LABELS),
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }
    atomic_write_text(json_path, json.dumps(meta, indent=1) + "\n")
    logger.info("wrote %d synthetic tumour cases (%d channel(s)) to %s", num_cases, num_channels, out)
    return out


def generate_anisotropic_dataset(
    out_dir: str | Path,
    num_cases: int = 6,
    seed: int = 0,
    shape: tuple[int, int, int] = (24, 160, 160),
    spacing: tuple[float, float, float] = (6.5, 0.78, 0.78),
) -> Path:
    """Write a thick-slice dataset (MSD layout): :func:`medseg.io.synthetic.generate_synthetic_dataset`
    with a 6.5 mm slice spacing and 0.78 mm in-plane by default."""
    return generate_synthetic_dataset(out_dir, num_cases=num_cases, seed=seed, shape=shape, spacing=spacing)


__all__ = ["TUMOUR_CHANNELS", "TUMOUR_LABELS", "generate_anisotropic_dataset", "generate_tumour_dataset"]
