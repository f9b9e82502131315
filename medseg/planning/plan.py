"""Plan dataclasses: the single, human-editable description of how a dataset is processed and trained.

A :class:`Plan` is a frozen dataclass tree written to ``WORK/plans.json``. ``to_json``/``from_json``
round-trip exactly and write only Python builtins (conversion: :mod:`medseg.io.codec`; schema history
and migration: :mod:`medseg.planning.plan_json`; plans of schema version 1 load, migrated). Unknown keys,
missing keys and inconsistent values (e.g. a patch size not divisible by the network's pooling) are refused with a
:class:`PlanError`.

Conventions: every shape, spacing and patch size is in array order ``(Z, Y, X)`` (``(Y, X)`` for 2D
patches); spacing in mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from medseg.errors import ConfigError, PlanError, raise_for_problems
from medseg.io.codec import from_json_dict, to_json_dict
from medseg.io.image import atomic_write_text
from medseg.io.json_files import load_json_file, parse_json
from medseg.networks.registry import build_network, topology_problems
from medseg.networks.spec import NetworkSpec
from medseg.options import PRECISIONS, DeviceKind, NormalizationScheme, Precision, choices
from medseg.planning.plan_checks import previous_stage_problems, region_problems
from medseg.planning.plan_json import SCHEMA_VERSION, dumps_readable, migrate_plan_dict

__all__ = [
    "SCHEMA_VERSION",
    "ConfigurationPlan",
    "NetworkPlan",
    "NetworkSpec",
    "NormalizationSpec",
    "Plan",
    "dumps_readable",
]


@dataclass(frozen=True)
class NormalizationSpec:
    """Intensity normalisation of one input channel.

    Attributes:
        scheme: ``"ct"`` clips to ``[clip_low, clip_high]`` then z-scores with the dataset's foreground
            ``mean``/``std``; ``"zscore"`` z-scores each image with its own statistics (inside the
            nonzero mask when ``use_nonzero_mask``); ``"none"`` leaves intensities as they are.
    """

    scheme: str
    use_nonzero_mask: bool = False
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class NetworkPlan:
    """One architecture as planned for one configuration: its topology plus patch, batch and precision.

    Attributes:
        spec: the network topology (:class:`~medseg.networks.spec.NetworkSpec`).
        patch_size: training patch, ``(Z, Y, X)`` or ``(Y, X)`` voxels.
        batch_size: training batch size.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (mixed precision autocast).
        estimated_memory_gb: memory one training step is estimated to need at ``precision`` (GiB).
    """

    spec: NetworkSpec
    patch_size: tuple[int, ...]
    batch_size: int
    precision: str = Precision.FP32
    estimated_memory_gb: float | None = None

    @property
    def arch(self) -> str:
        """Registry name of the architecture (``spec.arch``)."""
        return self.spec.arch

    @property
    def dims(self) -> int:
        return len(self.patch_size)

    def total_stride(self) -> tuple[int, ...]:
        """Product of the strides per axis (the factor the patch must be divisible by)."""
        return self.spec.total_stride()

    def summary(self) -> dict[str, Any]:
        """Width, patch, batch and precision as JSON builtins (how budget notes and run records name a network)."""
        return {
            "base_features": self.spec.base_features,
            "max_features": self.spec.max_features,
            "patch_size": list(self.patch_size),
            "batch_size": self.batch_size,
            "precision": str(self.precision),
        }

    def build(self, in_channels: int, num_classes: int) -> nn.Module:
        """Build this network for its patch (:func:`medseg.networks.build_network`).

        Args:
            in_channels: input channels ``C`` (:meth:`Plan.network_in_channels`).
            num_classes: outputs ``K`` (:attr:`Plan.num_classes`).

        Returns:
            The module in training mode on the CPU, mapping ``(B, C, *patch)`` to logits ``(B, K, *patch)``.

        Raises:
            ConfigError: an inconsistent network plan (topology, patch, batch or precision), or a network that
                cannot be built (unknown architecture, bad option).
        """
        raise_for_problems(self.check(f"network {self.arch!r}"), ConfigError, "inconsistent network plan")
        return build_network(self.spec, in_channels, num_classes, patch_size=self.patch_size)

    def check(self, where: str) -> list[str]:
        """Return the inconsistencies of this network plan (empty list when consistent)."""
        problems = list(self.spec.patch_problems(self.patch_size, where)[:1]) if self.dims not in (2, 3) else []
        if problems:
            return problems
        if any(p <= 0 for p in self.patch_size):
            problems.append(f"{where}: patch_size entries must be positive, got {list(self.patch_size)}")
        if self.batch_size < 1:
            problems.append(f"{where}: batch_size must be >= 1, got {self.batch_size}")
        spec_problems = self.spec.check(where)
        if self.spec.dims in (2, 3) and self.spec.dims != self.dims:
            spec_problems.append(
                f"{where}: kernel_sizes/strides entries do not have {self.dims} entries like "
                f"patch_size {list(self.patch_size)}"
            )
        problems += spec_problems
        if not problems:
            problems += self.spec.patch_problems(self.patch_size, where) or topology_problems(
                self.spec, self.patch_size, where
            )
        if self.precision not in PRECISIONS:
            problems.append(f"{where}: precision must be fp32, bf16 or fp16, got {self.precision!r}")
        return problems


@dataclass(frozen=True)
class ConfigurationPlan:
    """One configuration (``2d``, ``3d_fullres``, ``3d_lowres``).

    Attributes:
        name: configuration name.
        dims: 2 or 3 (2D configurations train on slices along axis 0 = Z).
        spacing: target spacing of the preprocessed data, always 3 entries ``(Z, Y, X)`` in mm.
        median_shape: median shape of the preprocessed (cropped, resampled) images, ``(Z, Y, X)``.
        normalization: one :class:`NormalizationSpec` per input channel.
        networks: planned architectures by registry name.
        default_arch: the architecture trained when none is given.
        data_identifier: folder under ``WORK/preprocessed`` holding this configuration's cache.
        previous_stage: for a cascade (``3d_cascade_fullres``), the configuration whose prediction this one
            refines (``3d_lowres``): its segmentation, mapped onto this configuration's grid, enters the
            network as one one-hot channel per foreground label after the image channels
            (:meth:`Plan.network_in_channels`, :mod:`medseg.preprocessing.previous_stage`). None for ordinary
            configurations.
        mirror_axes: axes of the *patch* (``(Z, Y, X)``, or ``(Y, X)`` for 2D) that training mirrors and
            mirror test-time augmentation flips; None = every axis. The planner leaves out an axis along
            which two foreground classes lie in the same order in (nearly) every case (see
            :func:`medseg.planning.mirroring.plan_mirror_axes`): mirrored, such a sample shows an anatomy
            that never occurs (e.g. the posterior hippocampus in front of the anterior one).
    """

    name: str
    dims: int
    spacing: tuple[float, ...]
    median_shape: tuple[int, ...]
    normalization: tuple[NormalizationSpec, ...]
    networks: dict[str, NetworkPlan]
    default_arch: str = "unet"
    data_identifier: str = ""
    previous_stage: str | None = None
    mirror_axes: tuple[int, ...] | None = None

    @property
    def patch_size(self) -> tuple[int, ...]:
        """Training patch of the default architecture (``networks[default_arch].patch_size``)."""
        return self.network().patch_size

    @property
    def batch_size(self) -> int:
        """Batch size of the default architecture (``networks[default_arch].batch_size``)."""
        return self.network().batch_size

    def resolved_mirror_axes(self) -> tuple[int, ...]:
        """The mirrored patch axes, with None made concrete (every axis)."""
        return tuple(range(self.dims)) if self.mirror_axes is None else tuple(self.mirror_axes)

    def network(self, arch: str | None = None) -> NetworkPlan:
        """Return the plan of ``arch`` (default architecture when None); clear error if not planned."""
        arch = arch or self.default_arch
        if arch not in self.networks:
            raise PlanError(
                f"architecture {arch!r} is not planned for configuration {self.name!r}; planned: "
                f"{sorted(self.networks)}. Re-run `medseg plan ... --archs {arch}`."
            )
        return self.networks[arch]

    def check(self, num_channels: int) -> list[str]:
        where = f"configurations.{self.name}"
        problems: list[str] = []
        if self.dims not in (2, 3):
            problems.append(f"{where}.dims must be 2 or 3, got {self.dims}")
        if len(self.spacing) != 3 or any(not (s > 0 and math.isfinite(s)) for s in self.spacing):
            problems.append(f"{where}.spacing must be 3 positive numbers (Z, Y, X) in mm, got {list(self.spacing)}")
        if len(self.normalization) != num_channels:
            problems.append(
                f"{where}.normalization has {len(self.normalization)} entries but the dataset has {num_channels} channels"
            )
        for i, n in enumerate(self.normalization):
            if n.scheme not in choices(NormalizationScheme):
                problems.append(
                    f"{where}.normalization[{i}].scheme must be one of {choices(NormalizationScheme)}, got {n.scheme!r}"
                )
            if n.scheme == NormalizationScheme.CT and (
                n.mean is None or n.std is None or n.clip_low is None or n.clip_high is None
            ):
                problems.append(f"{where}.normalization[{i}]: scheme 'ct' needs clip_low, clip_high, mean and std")
        if self.mirror_axes is not None:
            axes = list(self.mirror_axes)
            if len(set(axes)) != len(axes) or any(a < 0 or a >= self.dims for a in axes):
                problems.append(
                    f"{where}.mirror_axes must be distinct patch axes in 0..{self.dims - 1} "
                    f"(or null for every axis), got {axes}"
                )
        if self.default_arch not in self.networks:
            problems.append(f"{where}.default_arch {self.default_arch!r} is not among networks {sorted(self.networks)}")
        for arch, net in self.networks.items():
            if net.arch != arch:
                problems.append(f"{where}.networks.{arch}.arch is {net.arch!r}; it must equal its key")
            if net.dims != self.dims:
                problems.append(
                    f"{where}.networks.{arch}.patch_size has {net.dims} entries, configuration dims is {self.dims}"
                )
            problems += net.check(f"{where}.networks.{arch}")
        return problems


@dataclass(frozen=True)
class Plan:
    """Everything decided about a dataset before training.

    Attributes:
        dataset_name: from dataset.json.
        channel_names: one name per input channel (e.g. ``["CT"]``).
        label_ids: original label ids, background first; class index ``i`` <-> ``label_ids[i]``.
        label_names: names matching ``label_ids``.
        original_median_spacing / original_median_shape: of the raw data (after cropping), ``(Z, Y, X)``.
        configurations: by name.
        device: device the plan was sized for (``cpu`` / ``cuda``).
        gpu_memory_gb: memory budget the patch/batch fitting used.
        time_budget_minutes: training budget the plan was chosen for (None = full schedule).
        notes: free-form reasoning recorded by the planner (measured step times etc.).
        ignore_label: original id of the dataset's ``ignore`` label (partial annotation), or None. It is
            not a class: not in ``label_ids``, no network output; preprocessing stores it as class index
            :attr:`ignore_class` (``K``), which no loss or metric counts and no prediction holds.
        regions: region-based training (nnU-Net v2, :mod:`medseg.io.regions`): per region the original
            label ids it holds; one sigmoid network output per region. None for ordinary (softmax) plans.
        regions_class_order: the label id written for each region when turning region probabilities
            into a label map (later regions overwrite earlier ones); None without regions.
    """

    dataset_name: str
    channel_names: tuple[str, ...]
    label_ids: tuple[int, ...]
    label_names: tuple[str, ...]
    original_median_spacing: tuple[float, ...]
    original_median_shape: tuple[int, ...]
    configurations: dict[str, ConfigurationPlan]
    default_configuration: str = "3d_fullres"
    device: str = DeviceKind.CUDA
    gpu_memory_gb: float = 8.0
    time_budget_minutes: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    ignore_label: int | None = None
    regions: tuple[tuple[int, ...], ...] | None = None
    regions_class_order: tuple[int, ...] | None = None

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Network outputs: classes including background (the ignore label is no class), or one per region."""
        return len(self.regions) if self.regions else len(self.label_ids)

    @property
    def is_region_based(self) -> bool:
        return bool(self.regions)

    @property
    def previous_stage_channels(self) -> int:
        """One-hot channels a cascade adds for the previous stage's segmentation: one per foreground label."""
        return len(self.label_ids) - 1

    def network_in_channels(self, configuration: str | None = None) -> int:
        """Input channels of the networks of ``configuration``: the image channels, plus
        :attr:`previous_stage_channels` for a cascade (a configuration with ``previous_stage``)."""
        extra = self.previous_stage_channels if self.configuration(configuration).previous_stage else 0
        return self.num_channels + extra

    @property
    def region_classes(self) -> tuple[tuple[int, ...], ...]:
        """Per region the *class indices* (positions in ``label_ids``) it holds; empty without regions."""
        index = {int(v): i for i, v in enumerate(self.label_ids)}
        return tuple(tuple(index[int(i)] for i in reg) for reg in self.regions or ())

    @property
    def ignore_class(self) -> int | None:
        """Class index of ignored voxels in preprocessed label maps (``len(label_ids)``); None without ignore label."""
        return None if self.ignore_label is None else len(self.label_ids)

    def configuration(self, name: str | None = None) -> ConfigurationPlan:
        name = name or self.default_configuration
        if name not in self.configurations:
            raise PlanError(f"configuration {name!r} is not in the plan; available: {sorted(self.configurations)}")
        return self.configurations[name]

    def check(self) -> list[str]:
        problems: list[str] = []
        if self.schema_version != SCHEMA_VERSION:
            problems.append(f"schema_version {self.schema_version} is not supported (expected {SCHEMA_VERSION})")
        if not self.label_ids or self.label_ids[0] != 0:
            problems.append(f"label_ids must start with background 0, got {list(self.label_ids)}")
        if len(set(self.label_ids)) != len(self.label_ids):
            problems.append(f"label_ids has duplicates: {list(self.label_ids)}")
        if len(self.label_names) != len(self.label_ids):
            problems.append("label_names and label_ids must have the same length")
        ignore = self.ignore_label
        if ignore is not None and (
            isinstance(ignore, bool) or not isinstance(ignore, int) or ignore <= max(self.label_ids, default=0)
        ):
            problems.append(
                f"ignore_label must be an integer id above every label id {list(self.label_ids)}, "
                f"got {self.ignore_label!r}"
            )
        problems += region_problems(self.label_ids, self.regions, self.regions_class_order)
        if not self.configurations:
            problems.append("plan has no configurations")
        if self.default_configuration not in self.configurations:
            problems.append(
                f"default_configuration {self.default_configuration!r} is not among {sorted(self.configurations)}"
            )
        for name, cfg in self.configurations.items():
            if cfg.name != name:
                problems.append(f"configurations.{name}.name is {cfg.name!r}; it must equal its key")
            problems += cfg.check(self.num_channels)
            problems += previous_stage_problems(cfg, self.configurations)
        return problems

    def validate(self) -> Plan:
        """Raise :class:`PlanError` listing every inconsistency; return self when consistent."""
        raise_for_problems(self.check(), PlanError, "inconsistent plan")
        return self

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = to_json_dict(self)
        if self.regions is None and self.regions_class_order is None:  # plans without regions stay as before
            d.pop("regions")
            d.pop("regions_class_order")
        return d

    def to_json(self) -> str:
        """Indented JSON with short lists of numbers kept on one line, so a person can read and edit it."""
        return dumps_readable(self.to_dict()) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Plan from builtins of the current schema or of schema version 1 (migrated); validated.

        Raises:
            PlanError: malformed, inconsistent, or a version-1 plan that cannot be migrated.
        """
        return from_json_dict(cls, migrate_plan_dict(d), "plan", PlanError).validate()

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(parse_json(text, "plan", PlanError))

    def save(self, path: str | Path) -> None:
        """Validate and write atomically."""
        self.validate()
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return load_json_file(
            path, cls.from_dict, "plan", PlanError, missing="plan file not found (run `medseg plan` first)"
        )
