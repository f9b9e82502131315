"""A small synthetic segmentation dataset written as real NIfTI files in the MSD layout.

Used by the tests and by ``medseg demo``. Each case is an MRI-like volume with anisotropic spacing
(coarse Z), an oblique (rotated) direction and a non-zero origin. A body region of positive intensity
sits in a zero background (so cropping to the nonzero region matters) and holds three labelled
structures of different sizes:

* structure 1: a large ellipsoid,
* structure 2: a medium ellipsoid straddling the surface of structure 1 (partly inside it),
* structure 3: a small sphere on the opposite side of structure 1.

Each structure has its own mean intensity; Gaussian noise and a smooth multiplicative bias field are
added, and the overall intensity scale differs per case. Shapes vary by up to two voxels per axis
between cases. Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.io.image import ImageGeometry, atomic_write_text, write_image

logger = logging.getLogger(__name__)

DATASET_NAME = "MedsegSynthetic"
STRUCTURE_NAMES = ("background", "large", "medium", "small")
#: Mean intensity of the body and of structures 1, 2, 3 (before the per-case scale and bias field).
_MEANS = (100.0, 180.0, 260.0, 340.0)
_NOISE_STD = 12.0


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix by 15-35 degrees about a random axis (Rodrigues' formula)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(15.0, 35.0))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation: np.ndarray = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
    return rotation


def _ellipsoid(coords: tuple[np.ndarray, ...], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid; coords/center/radii in mm, (Z, Y, X) order."""
    d = sum(((c - m) / r) ** 2 for c, m, r in zip(coords, center, radii))
    inside: np.ndarray = d <= 1.0
    return inside


def _check_sizes(num_cases: int, shape: tuple[int, ...], spacing: tuple[float, ...], min_size: int) -> None:
    """Refuse fewer than one case, a ``shape`` that is not three sizes >= ``min_size`` or a ``spacing``
    that is not three positive values (mm) with ``ValueError``."""
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    if len(shape) != 3 or min(shape) < min_size:
        raise ValueError(f"shape must be three sizes >= {min_size} (Z, Y, X), got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive values in mm, got {spacing}")


def _start_dataset(out: Path, name: str, description: str | None = None) -> Path:
    """Create ``out/imagesTr`` and ``out/labelsTr`` for a synthetic dataset called ``name``; return the path
    of its ``dataset.json`` (written last, by the caller).

    Raises:
        MedsegError: ``out`` holds the ``dataset.json`` of another dataset (the message names the expected
            kind, ``description``, default ``name``); nothing is created then.
    """
    json_path = out / "dataset.json"
    if json_path.exists():
        try:
            existing = json.loads(json_path.read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            existing = None
        if existing != name:
            raise MedsegError(
                f"{json_path}: refusing to overwrite a dataset that is not a {description or name} dataset"
            )
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    return json_path


def _centred_coords(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Voxel-centre coordinates in mm relative to the volume centre, broadcastable ``(Z, 1, 1)``,
    ``(1, Y, 1)``, ``(1, 1, X)``, and the volume's extent in mm per axis."""
    sp = np.asarray(spacing, dtype=np.float64)
    coords = tuple(
        ((np.arange(n) - (n - 1) / 2.0) * s).reshape([-1 if a == ax else 1 for a in range(3)])
        for ax, (n, s) in enumerate(zip(shape, sp))
    )
    return coords, np.asarray(shape) * sp


def _case_geometry(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    direction: np.ndarray | None = None,
    origin_range: float = 100.0,
) -> ImageGeometry:
    """A case's geometry: ``shape`` and ``spacing`` (x, y, z), a random origin within +-``origin_range`` mm
    (drawn from ``rng``, rounded to 1e-3) and ``direction`` (3x3; identity when None)."""
    origin = tuple(float(v) for v in np.round(rng.uniform(-origin_range, origin_range, size=3), 3))
    return ImageGeometry(
        shape=tuple(int(s) for s in shape),
        spacing=tuple(float(s) for s in spacing),
        origin=origin,
        direction=tuple(float(v) for v in (np.eye(3) if direction is None else direction).ravel()),
    )


def _write_case(
    out: Path, case_id: str, images: np.ndarray | list[np.ndarray], label: np.ndarray, geometry: ImageGeometry
) -> dict[str, str]:
    """Write a case's image(s) and label map (``labelsTr/CASE.nii.gz``) with ``geometry``.

    Args:
        images: one array (MSD layout: ``imagesTr/CASE.nii.gz``) or one array per channel
            (``imagesTr/CASE_0000.nii.gz``, ``CASE_0001``, ...).

    Returns:
        The case's ``dataset.json`` ``training`` entry (MSD layout).
    """
    if isinstance(images, np.ndarray):
        write_image(images, geometry, out / "imagesTr" / f"{case_id}.nii.gz")
    else:
        for ch, image in enumerate(images):
            write_image(image, geometry, out / "imagesTr" / f"{case_id}_{ch:04d}.nii.gz")
    write_image(label, geometry, out / "labelsTr" / f"{case_id}.nii.gz")
    return {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}


def _make_case(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...], label_ids: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """One case: image float32 ``(Z, Y, X)`` and label ``(Z, Y, X)`` with ids from ``label_ids``."""
    coords, extent = _centred_coords(shape, spacing)

    body_radii = extent * rng.uniform(0.40, 0.46, size=3)
    body_center = extent * rng.uniform(-0.03, 0.03, size=3)
    body = _ellipsoid(coords, body_center, body_radii)

    size = float(extent.min())
    r1 = size * rng.uniform(0.17, 0.22, size=3)
    c1 = body_center + extent * rng.uniform(-0.06, 0.06, size=3)
    u = rng.normal(size=3)
    u /= np.linalg.norm(u)
    surface = 1.0 / np.sqrt(np.sum((u / r1) ** 2))  # distance from c1 to the ellipsoid surface along u
    r2 = size * rng.uniform(0.08, 0.11, size=3)
    c2 = c1 + u * surface * rng.uniform(0.7, 0.95)
    r3 = float(rng.uniform(3.0, 4.0))
    c3 = c1 - u * (surface + r3 + 1.5)
    limit = body_radii - r3 - 1.0  # keep the small sphere inside the body
    c3 = body_center + np.clip(c3 - body_center, -limit, limit)

    label = np.zeros(shape, dtype=np.uint8 if max(label_ids) < 256 else np.uint16)
    masks = (_ellipsoid(coords, c1, r1), _ellipsoid(coords, c2, r2), _ellipsoid(coords, c3, np.full(3, r3)))
    for k, mask in enumerate(masks, start=1):
        label[mask & body] = label_ids[k]

    scale = rng.uniform(0.8, 1.25)
    means = np.asarray(_MEANS) * scale * rng.uniform(0.95, 1.05, size=4)
    lut = np.zeros(max(label_ids) + 1)
    for k, lid in enumerate(label_ids):
        lut[lid] = means[k]
    signal = lut[label]
    # smooth multiplicative bias field: exp of a random low-order polynomial, about +-25 %
    norm = [c / (e / 2.0) for c, e in zip(coords, extent)]
    lin = sum(rng.uniform(-0.15, 0.15) * n for n in norm)
    quad = sum(rng.uniform(-0.1, 0.1) * n * n for n in norm) + rng.uniform(-0.1, 0.1) * norm[1] * norm[2]
    bias = np.exp(lin + quad)
    image = signal * bias + rng.normal(0.0, _NOISE_STD * scale, size=shape)
    image = np.where(body, np.maximum(image, 1.0), 0.0).astype(np.float32)
    return image, label


def generate_synthetic_dataset(
    out_dir: str | Path,
    num_cases: int = 8,
    seed: int = 0,
    shape: tuple[int, int, int] = (20, 48, 40),
    spacing: tuple[float, float, float] = (3.0, 1.0, 1.2),
    label_ids: tuple[int, ...] = (0, 1, 2, 3),
) -> Path:
    """Write a synthetic MSD dataset (``imagesTr/``, ``labelsTr/``, ``dataset.json``) into ``out_dir``.

    Args:
        out_dir: dataset root; created if needed. An existing synthetic dataset there is overwritten,
            any other dataset is refused.
        num_cases: number of cases, named ``case_000``, ``case_001``, ...
        seed: random seed; the same seed gives identical files.
        shape: nominal image shape ``(Z, Y, X)``; each case differs by up to +-2 voxels per axis.
        spacing: voxel spacing in mm, ``(Z, Y, X)`` order (identical for all cases).
        label_ids: ids written for background and structures 1 (large), 2 (medium), 3 (small), e.g.
            ``(0, 1, 2, 5)`` for gapped ids. Declared in dataset.json as id -> name.

    Returns:
        The dataset root ``out_dir``.

    Raises:
        MedsegError: ``out_dir`` holds a dataset.json of another dataset.
        ValueError: invalid ``num_cases``, ``shape``, ``spacing`` or ``label_ids``.
    """
    out = Path(out_dir)
    _check_sizes(num_cases, shape, spacing, min_size=8)
    label_ids = tuple(int(i) for i in label_ids)
    if len(label_ids) != 4 or label_ids[0] != 0 or len(set(label_ids)) != 4 or min(label_ids) < 0:
        raise ValueError(f"label_ids must be 4 distinct non-negative ids starting with background 0, got {label_ids}")
    json_path = _start_dataset(out, DATASET_NAME, "medseg synthetic")
    training = []
    for i in range(num_cases):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i])
        case_shape = tuple(int(s + d) for s, d in zip(shape, rng.integers(-2, 3, size=3)))
        image, label = _make_case(rng, case_shape, spacing, label_ids)
        geometry = _case_geometry(rng, case_shape, spacing, direction=_rotation(rng), origin_range=120.0)
        training.append(_write_case(out, f"case_{i:03d}", image, label, geometry))

    meta = {
        "name": DATASET_NAME,
        "description": "Synthetic MRI-like volumes with three structures (medseg.io.synthetic)",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {str(lid): name for lid, name in zip(label_ids, STRUCTURE_NAMES)},
        "numTraining": num_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    atomic_write_text(json_path, json.dumps(meta, indent=1) + "\n")
    # cases of an earlier, larger synthetic dataset in the same folder would look like extra inputs
    for folder in (out / "imagesTr", out / "labelsTr"):
        for stale in folder.glob("case_[0-9][0-9][0-9].nii.gz"):
            if int(stale.name[5:8]) >= num_cases:
                stale.unlink()
    logger.info("wrote %d synthetic cases to %s", num_cases, out)
    return out
