"""Builders of tiny MSD / nnU-Net v2 datasets for the dataset loading and validation tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHAPE = (6, 9, 8)  # (Z, Y, X)
SPACING_XYZ = (0.9, 1.1, 2.5)
ORIGIN = (10.0, -20.0, 5.0)
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
ID_TO_NAME = {"0": "background", "1": "left", "2": "right"}


def image_array(seed: int = 0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1.0, 100.0, size=shape).astype(np.float32)


def label_array(shape=SHAPE, ids=(1, 2)) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    lab[1:3, 2:5, 2:5] = ids[0]
    lab[3:5, 5:8, 3:6] = ids[1]
    return lab


def write(path: Path, arr: np.ndarray, spacing=SPACING_XYZ, origin=ORIGIN, direction=DIRECTION) -> Path:
    """Write ``arr`` ((Z, Y, X) or any dimensionality) with SimpleITK; geometry in SimpleITK (x, y, z) order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr, isVector=False)
    d = img.GetDimension()
    img.SetSpacing(tuple(spacing[:d]) + (1.0,) * max(0, d - len(spacing)))
    img.SetOrigin(tuple(origin[:d]) + (0.0,) * max(0, d - len(origin)))
    if d == 3:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def write_msd(
    root: Path, n: int = 3, ending: str = ".nii.gz", labels: dict | None = None, modality: dict | None = None
) -> Path:
    """A valid single-channel MSD dataset ``case_000 ...`` with a ``training`` list."""
    root.mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n):
        cid = f"case_{i:03d}"
        write(root / "imagesTr" / f"{cid}{ending}", image_array(i))
        write(root / "labelsTr" / f"{cid}{ending}", label_array())
        training.append({"image": f"./imagesTr/{cid}{ending}", "label": f"./labelsTr/{cid}{ending}"})
    meta = {
        "name": "Tiny",
        "modality": modality or {"0": "MRI"},
        "labels": labels or ID_TO_NAME,
        "numTraining": n,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def write_nnunet(root: Path, n: int = 3, channels: int = 2, ending: str = ".nii.gz") -> Path:
    """A valid nnU-Net v2 dataset: ``CASE_0000..``, labels name -> id, ``file_ending``, no training list."""
    for i in range(n):
        cid = f"pat{i}"
        for c in range(channels):
            write(root / "imagesTr" / f"{cid}_{c:04d}{ending}", image_array(10 * i + c))
        write(root / "labelsTr" / f"{cid}{ending}", label_array())
    meta = {
        "channel_names": {str(c): name for c, name in zip(range(channels), ("T1", "FLAIR", "T2", "PD"))},
        "labels": {"background": 0, "left": 1, "right": 2},
        "numTraining": n,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def edit_json(root: Path, **changes) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
