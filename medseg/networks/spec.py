"""NetworkSpec: the topology of one segmentation network, independent of patch, batch and precision.

A :class:`NetworkSpec` is what an architecture builder needs to lay out its layers: the registry name,
per-stage kernel sizes and strides, feature counts, normalisation, deep supervision and
architecture-specific options. Patch size, batch size, precision and the memory estimate are planning
decisions; they live in the planning layer's ``NetworkPlan``, which holds a spec (networks never import
planning).

Conventions: kernel sizes and strides are per stage, per axis in array order ``(Z, Y, X)`` (``(Y, X)``
for 2D networks); stage 0 does not downsample (all strides 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from medseg.options import NormLayer, choices


@dataclass(frozen=True)
class NetworkSpec:
    """Topology of one architecture.

    Attributes:
        arch: registry name (``unet``, ``deeplab``, ``psp``, ``fcn``).
        kernel_sizes: per stage, per axis convolution kernel size.
        strides: per stage, per axis downsampling stride; stage 0 is all ones.
        base_features: channels of the first stage; doubled per stage up to ``max_features``.
        max_features: cap on channels per stage.
        n_conv_per_stage: convolutions per encoder stage.
        norm: normalisation layer, a :class:`~medseg.options.NormLayer` value (``instance``, ``batch``, ``group``).
        deep_supervision: whether training uses auxiliary lower-resolution outputs.
        options: architecture-specific settings (e.g. ``{"output_stride": 8}``), builtins only.
    """

    arch: str
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    base_features: int = 32
    max_features: int = 320
    n_conv_per_stage: int = 2
    norm: str = NormLayer.INSTANCE
    deep_supervision: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        """Spatial dimensions (2 or 3): the length of the first stage's stride (or kernel) entry."""
        first = self.strides[0] if self.strides else (self.kernel_sizes[0] if self.kernel_sizes else ())
        return len(first)

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    def total_stride(self) -> tuple[int, ...]:
        """Product of the strides per axis (the factor every input size must be divisible by)."""
        out = [1] * self.dims
        for s in self.strides:
            for i, v in enumerate(s):
                out[i] *= v
        return tuple(out)

    def features_per_stage(self) -> tuple[int, ...]:
        """Channels per stage: ``base_features * 2**s`` capped at ``max_features``."""
        return tuple(min(self.base_features * 2**i, self.max_features) for i in range(self.num_stages))

    def check(self, where: str) -> list[str]:
        """Return the inconsistencies of this topology (empty list when consistent).

        Args:
            where: prefix of every message (e.g. ``"configurations.3d_fullres.networks.unet"``).
        """
        problems: list[str] = []
        d = self.dims
        if d not in (2, 3):
            problems.append(f"{where}: kernel_sizes/strides entries must have 2 or 3 axes, got {d}")
            return problems
        if len(self.kernel_sizes) != len(self.strides):
            problems.append(
                f"{where}: kernel_sizes has {len(self.kernel_sizes)} stages but strides has {len(self.strides)}"
            )
        for name, seq in (("kernel_sizes", self.kernel_sizes), ("strides", self.strides)):
            for i, s in enumerate(seq):
                if len(s) != d:
                    problems.append(f"{where}: {name}[{i}] = {list(s)} does not have {d} entries")
                if any(v < 1 for v in s):
                    problems.append(f"{where}: {name}[{i}] = {list(s)} has entries < 1")
        if self.strides and any(v != 1 for v in self.strides[0]):
            problems.append(f"{where}: strides[0] must be all ones (the first stage does not downsample)")
        if self.norm not in choices(NormLayer):
            problems.append(f"{where}: norm must be one of {choices(NormLayer)}, got {self.norm!r}")
        if self.base_features < 1 or self.max_features < self.base_features:
            problems.append(f"{where}: need 1 <= base_features <= max_features")
        return problems

    def patch_problems(self, patch_size: Sequence[int], where: str) -> list[str]:
        """Return why ``patch_size`` cannot be fed to this topology (empty list when it can).

        Args:
            patch_size: input spatial size, ``(Z, Y, X)`` or ``(Y, X)`` voxels.
            where: prefix of every message.
        """
        patch = list(patch_size)
        if len(patch) not in (2, 3):
            return [f"{where}: patch_size must have 2 or 3 entries, got {patch}"]
        if any(p <= 0 for p in patch):
            return [f"{where}: patch_size entries must be positive, got {patch}"]
        if len(patch) != self.dims:
            return [f"{where}: kernel_sizes/strides entries do not have {len(patch)} entries like patch_size"]
        ts = self.total_stride()
        bad = [i for i in range(len(patch)) if patch[i] % ts[i] != 0]
        if not bad:
            return []
        return [
            f"{where}: patch_size {patch} is not divisible by the network's total downsampling {list(ts)} on axis "
            f"{bad}; use e.g. {[max(ts[i], int(round(patch[i] / ts[i])) * ts[i]) for i in range(len(patch))]}"
        ]
