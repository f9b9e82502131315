"""Fixtures for preprocessing tests: hand-built plans and tiny NIfTI datasets (no planner, no dataset.py needed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.planning.plan import ConfigurationPlan, NormalizationSpec, Plan
from tests.helpers import network_plan


def _rotation(axis, angle: float) -> tuple[float, ...]:
    """Row-major rotation matrix about ``axis`` by ``angle`` radians (Rodrigues)."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    r = np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx
    return tuple(float(v) for v in r.ravel())


OBLIQUE_DIRECTION = _rotation((0.3, -0.5, 0.8), 0.4)  # oblique, orthonormal, det +1


@dataclass(frozen=True)
class FakeCase:
    """Duck-typed ``medseg.io.dataset.Case``."""

    case_id: str
    image_files: tuple[Path, ...]
    label_file: Path | None


@dataclass(frozen=True)
class FakeDataset:
    """Duck-typed ``medseg.io.dataset.DatasetInfo`` (only what preprocess_dataset reads)."""

    root: Path
    cases: tuple[FakeCase, ...]
    num_channels: int = 1


def build_plan(
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    label_ids: Sequence[int] = (0, 1, 2),
    norm: Sequence[NormalizationSpec] | None = None,
    configs: Sequence[str] = ("3d_fullres",),
    data_identifiers: dict[str, str] | None = None,
    spacings: dict[str, Sequence[float]] | None = None,
) -> Plan:
    """A valid plan built by hand; configuration ``2d`` gets a 2D network, the others a 3D one."""
    norm = tuple(norm) if norm is not None else (NormalizationSpec("zscore"),)
    net3 = network_plan("unet", (16, 16, 16), 2, ((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)))
    net2 = network_plan("unet", (16, 16), 8, ((3, 3),) * 3, ((1, 1), (2, 2), (2, 2)))
    cfgs = {}
    for name in configs:
        net = net2 if name == "2d" else net3
        cfgs[name] = ConfigurationPlan(
            name=name,
            dims=net.dims,
            spacing=tuple(float(s) for s in (spacings or {}).get(name, spacing)),
            median_shape=(16, 16, 16),
            normalization=norm,
            networks={"unet": net},
            data_identifier=(data_identifiers or {}).get(name, ""),
        )
    return Plan(
        dataset_name="test",
        channel_names=tuple(f"ch{i}" for i in range(len(norm))),
        label_ids=tuple(label_ids),
        label_names=tuple(f"l{i}" for i in label_ids),
        original_median_spacing=tuple(float(s) for s in spacing),
        original_median_shape=(16, 16, 16),
        configurations=cfgs,
        default_configuration=configs[0],
    ).validate()


@pytest.fixture
def make_plan() -> Callable[..., Plan]:
    return build_plan


def blob_case(shape=(12, 20, 18), seed=0, label_ids=(0, 1, 2), margin=2) -> tuple[np.ndarray, np.ndarray]:
    """A positive image with a zero frame of ``margin`` voxels (cropped away) and two ellipsoid labels."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    label = np.zeros(shape, dtype=np.int16)
    label[(zz / 0.6) ** 2 + ((yy - 0.2) / 0.45) ** 2 + ((xx + 0.1) / 0.5) ** 2 < 1] = label_ids[1]
    label[(zz / 0.5) ** 2 + ((yy + 0.45) / 0.3) ** 2 + ((xx - 0.3) / 0.35) ** 2 < 1] = label_ids[2]
    image = 100 + 50 * (label > 0) + 10 * rng.standard_normal(shape)
    frame = np.zeros(shape, dtype=bool)
    frame[margin:-margin, margin:-margin, margin:-margin] = True
    image[~frame] = 0
    label[~frame] = 0
    return image.astype(np.float32), label


def write_nifti(
    path: Path, array: np.ndarray, spacing_zyx, origin=(10.0, -20.0, 30.5), direction=OBLIQUE_DIRECTION
) -> Path:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    img.SetOrigin(origin)
    img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Callable[..., FakeDataset]:
    """``make(n, spacing)``: n blob cases written as NIfTI under ``tmp_path/data``."""

    def make(n: int = 4, spacing=(2.0, 1.0, 1.0), label_ids=(0, 1, 2)) -> FakeDataset:
        root = tmp_path / "data"
        cases = []
        for i in range(n):
            image, label = blob_case(seed=i, label_ids=label_ids)
            cid = f"case_{i:03d}"
            img = write_nifti(root / "imagesTr" / f"{cid}.nii.gz", image, spacing)
            lab = write_nifti(
                root / "labelsTr" / f"{cid}.nii.gz",
                label.astype(np.uint8 if max(label_ids) < 256 else np.int16),
                spacing,
            )
            cases.append(FakeCase(cid, (img,), lab))
        return FakeDataset(root, tuple(cases))

    return make
