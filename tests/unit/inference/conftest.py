"""Fixtures for inference tests: hand-built plans, tiny deterministic networks, oblique NIfTI images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg.inference import EnsembleMember, Predictor
from medseg.planning.plan import ConfigurationPlan, NormalizationSpec, Plan
from tests.helpers import network_plan

# oblique, orthonormal direction (rotation about (0.3, -0.5, 0.8) by 0.4 rad), SimpleITK row-major order
_k = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
_kx = np.array([[0, -_k[2], _k[1]], [_k[2], 0, -_k[0]], [-_k[1], _k[0], 0]])
OBLIQUE = tuple(float(v) for v in (np.eye(3) + np.sin(0.4) * _kx + (1 - np.cos(0.4)) * _kx @ _kx).ravel())


def build_plan(
    spacings: dict[str, Sequence[float]] | None = None,
    label_ids: Sequence[int] = (0, 1),
    median_spacing: Sequence[float] = (3.0, 1.0, 1.2),
    channels: int = 1,
) -> Plan:
    """Plan with ``3d_fullres`` (patch 8x16x16) and, when in ``spacings``, ``2d`` (patch 16x16)."""
    spacings = spacings or {"3d_fullres": median_spacing}
    net3 = network_plan("unet", (8, 16, 16), 2, ((3, 3, 3),) * 2, ((1, 1, 1), (2, 2, 2)))
    net2 = network_plan("unet", (16, 16), 4, ((3, 3),) * 2, ((1, 1), (2, 2)))
    cfgs = {}
    for name, sp in spacings.items():
        net = net2 if name == "2d" else net3
        cfgs[name] = ConfigurationPlan(
            name=name,
            dims=net.dims,
            spacing=tuple(float(s) for s in sp),
            median_shape=(10, 24, 20),
            normalization=(NormalizationSpec("zscore"),) * channels,
            networks={"unet": net},
        )
    return Plan(
        dataset_name="test",
        channel_names=tuple(f"ch{i}" for i in range(channels)),
        label_ids=tuple(label_ids),
        label_names=tuple(f"l{i}" for i in label_ids),
        original_median_spacing=tuple(float(s) for s in median_spacing),
        original_median_shape=(10, 24, 20),
        configurations=cfgs,
        default_configuration=next(iter(spacings)),
    ).validate()


class Threshold(torch.nn.Module):
    """Two classes: class 1 where the (normalised) first channel is > 0. Works for 2D and 3D input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), 10.0 * x[:, :1]], 1)


def threshold_predictor(channels: int = 1) -> Predictor:
    """A :class:`Threshold` predictor (label ids 0 and 5, 3d_fullres at 3.0 x 0.8 x 1.2 mm), no TTA."""
    plan = build_plan(
        label_ids=(0, 5), channels=channels, spacings={"3d_fullres": (3.0, 0.8, 1.2)}, median_spacing=(3.0, 0.8, 1.2)
    )
    return Predictor([EnsembleMember(Threshold(), plan, "3d_fullres", "unet")], use_tta=False)


def conv_net(dims: int = 3, classes: int = 2, seed: int = 0, channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(
        conv(channels, 4, 3, padding=1), torch.nn.LeakyReLU(), conv(4, classes, 3, padding=1)
    ).eval()


def bright_box_image(shape=(10, 24, 20), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Positive noisy image (no zero frame) with a bright box; returns (image (Z,Y,X) float32, box mask)."""
    rng = np.random.default_rng(seed)
    box = np.zeros(shape, bool)
    box[3:7, 6:16, 5:14] = True
    image = 100.0 + 100.0 * box + rng.normal(0, 1, shape)
    return image.astype(np.float32), box


def write_oblique(
    path: Path, array: np.ndarray, spacing_zyx=(3.0, 0.8, 1.2), origin=(10.0, -20.5, 31.25)
) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    img.SetOrigin(origin)
    img.SetDirection(OBLIQUE)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return img


@pytest.fixture
def plan_3d() -> Plan:
    return build_plan()
