"""A synthetic dataset with many small objects per case: lesion-like blobs of varied size, and unlabelled mimics.

Each case is a ``shape`` volume whose slice spacing is drawn per case from ``z_spacings`` (in-plane 1 mm), so
the same number of voxels means a different volume in mL from case to case. An organ-like ellipsoid of
positive intensity sits in a zero background and holds

* 4-12 *lesions* (label 1): irregular blobs (unions of two ellipsoids) of radius 1.5-7 mm drawn on a log scale,
  brighter than the organ, with the contrast varying per lesion;
* 3-10 *mimics* (not labelled): bright specks of radius 0.6-1.4 mm, as bright as a lesion, the kind of small
  false positive a minimum-component-volume rule exists for.

Gaussian noise and a smooth multiplicative bias field are added. Everything is deterministic given the seed;
another dataset in the folder is refused (:func:`medseg.io.synthetic._start_dataset`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from medseg.io.image import atomic_write_text
from medseg.io.synthetic import _case_geometry, _centred_coords, _check_sizes, _ellipsoid, _start_dataset, _write_case

__all__ = ["LESION_DATASET_NAME", "LESION_LABELS", "generate_lesion_dataset"]

logger = logging.getLogger(__name__)

LESION_DATASET_NAME = "MedsegSyntheticLesions"
LESION_LABELS = {"background": 0, "lesion": 1}
_ORGAN_MEAN = 100.0
_LESION_MEAN = 170.0
_NOISE_STD = 12.0


def _lesion_case(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """One case: image float32 ``(Z, Y, X)`` and label uint8 ``(Z, Y, X)`` (0 background, 1 lesion)."""
    coords, extent = _centred_coords(shape, spacing)
    organ_r = extent * rng.uniform(0.40, 0.46, size=3)
    organ = _ellipsoid(coords, np.zeros(3), organ_r)
    label = np.zeros(shape, dtype=np.uint8)
    signal = np.where(organ, _ORGAN_MEAN, 0.0)
    for _ in range(int(rng.integers(4, 13))):
        radius = float(np.exp(rng.uniform(np.log(1.5), np.log(7.0))))
        centre = rng.uniform(-1.0, 1.0, size=3) * np.maximum(organ_r - radius - 2.0, 1.0) * 0.75
        blob = _ellipsoid(coords, centre, radius * rng.uniform(0.7, 1.1, size=3))
        blob |= _ellipsoid(coords, centre + rng.normal(0.0, 0.4 * radius, 3), radius * rng.uniform(0.5, 0.8, size=3))
        blob &= organ
        label[blob] = LESION_LABELS["lesion"]
        signal[blob] = _LESION_MEAN * rng.uniform(0.85, 1.15)
    for _ in range(int(rng.integers(3, 11))):
        radius = float(rng.uniform(0.6, 1.4))
        centre = rng.uniform(-0.8, 0.8, size=3) * organ_r
        speck = _ellipsoid(coords, centre, np.full(3, radius)) & organ & (label == 0)
        signal[speck] = _LESION_MEAN * rng.uniform(0.9, 1.1)
    norm = [c / (e / 2.0) for c, e in zip(coords, extent)]
    bias = np.exp(sum(rng.uniform(-0.12, 0.12) * n for n in norm))
    image = signal * bias + rng.normal(0.0, _NOISE_STD, size=shape)
    return np.where(organ, np.maximum(image, 1.0), 0.0).astype(np.float32), label


def generate_lesion_dataset(
    out_dir: str | Path,
    num_cases: int = 24,
    seed: int = 0,
    shape: tuple[int, int, int] = (64, 64, 64),
    z_spacings: tuple[float, ...] = (1.0, 1.5, 2.0),
    prefix: str = "lesion",
) -> Path:
    """Write a many-small-lesions dataset (MSD layout: ``imagesTr/``, ``labelsTr/``, ``dataset.json``).

    Args:
        out_dir: dataset root; created if needed. Another dataset there is refused.
        num_cases: number of cases, ``PREFIX_000``, ``PREFIX_001``, ...
        seed: random seed; the same seed gives identical files (use another seed for held-out cases).
        shape: image shape ``(Z, Y, X)``.
        z_spacings: slice spacings (mm) drawn from per case; in-plane spacing is 1 mm.
        prefix: case id prefix.

    Returns:
        The dataset root.

    Raises:
        MedsegError: ``out_dir`` holds another dataset.
        ValueError: invalid ``num_cases``, ``shape`` or spacings.
    """
    out = Path(out_dir)
    _check_sizes(num_cases, shape, (min(z_spacings), 1.0, 1.0), min_size=16)
    json_path = _start_dataset(out, LESION_DATASET_NAME)
    training = []
    for i in range(num_cases):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i, 38])
        spacing = (float(rng.choice(np.asarray(z_spacings, dtype=np.float64))), 1.0, 1.0)
        image, label = _lesion_case(rng, tuple(int(s) for s in shape), spacing)
        geometry = _case_geometry(rng, shape, spacing)
        training.append(_write_case(out, f"{prefix}_{i:03d}", image, label, geometry))
    meta = {
        "name": LESION_DATASET_NAME,
        "description": "Synthetic volumes with many small lesions and unlabelled mimics (medseg.io.synthetic_lesions)",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {str(v): k for k, v in LESION_LABELS.items()},
        "numTraining": num_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    atomic_write_text(json_path, json.dumps(meta, indent=1) + "\n")
    logger.info("wrote %d synthetic lesion cases to %s", num_cases, out)
    return out
