"""The resolved run context: one plan, one of its configurations and one of that configuration's networks.

A :class:`Stage` is resolved once, where a run or a prediction starts (:meth:`Stage.resolve`: the plan's
default configuration and architecture where none is given, a clear :class:`~medseg.errors.PlanError`
for one that is not planned), and handed on instead of the triple ``(plan, configuration name, arch
name)``. It answers the derived facts the trainer, the data loading, the final validation and the
predictor need (input channels, classes, patch, batch, mirrored axes, spacing, previous stage).

Conventions: patch sizes and mirrored axes are in patch order ``(Z, Y, X)`` (``(Y, X)`` for 2D),
spacing ``(Z, Y, X)`` in mm.
"""

from __future__ import annotations

from dataclasses import dataclass

from medseg.planning.plan import ConfigurationPlan, NetworkPlan, Plan

__all__ = ["Stage"]


@dataclass(frozen=True)
class Stage:
    """One network of one configuration of a plan, resolved.

    Attributes:
        plan: the whole plan (dataset labels, channels, the other configurations).
        configuration: the configuration's plan (``plan.configurations[name]``).
        network: the architecture's plan (``configuration.networks[arch]``).
    """

    plan: Plan
    configuration: ConfigurationPlan
    network: NetworkPlan

    @classmethod
    def resolve(cls, plan: Plan, configuration: str | None = None, arch: str | None = None) -> Stage:
        """The stage of ``configuration`` / ``arch`` in ``plan``.

        Args:
            plan: a validated plan.
            configuration: configuration name; None = ``plan.default_configuration``.
            arch: architecture name; None = the configuration's ``default_arch``.

        Returns:
            The resolved stage.

        Raises:
            PlanError: the configuration is not in the plan, or the architecture is not planned for it.
        """
        cfg = plan.configuration(configuration)
        return cls(plan, cfg, cfg.network(arch))

    def with_plan(self, plan: Plan) -> Stage:
        """The same configuration and architecture resolved in another plan (e.g. a refitted or run plan).

        Raises:
            PlanError: ``plan`` lacks this configuration or architecture.
        """
        return Stage.resolve(plan, self.config_name, self.arch)

    # ------------------------------------------------------------------ names
    @property
    def config_name(self) -> str:
        """Configuration name (e.g. ``3d_fullres``)."""
        return self.configuration.name

    @property
    def arch(self) -> str:
        """Registry name of the architecture (e.g. ``unet``)."""
        return self.network.arch

    @property
    def key(self) -> str:
        """``<configuration>/<arch>``, as messages and timing tables name a network."""
        return f"{self.config_name}/{self.arch}"

    # ------------------------------------------------------------------ derived facts
    @property
    def in_channels(self) -> int:
        """Network input channels ``C``: image channels plus a cascade's previous-stage channels."""
        return self.plan.network_in_channels(self.config_name)

    @property
    def num_classes(self) -> int:
        """Network outputs ``K`` (:attr:`Plan.num_classes`)."""
        return self.plan.num_classes

    @property
    def dims(self) -> int:
        """2 or 3: the dimensionality of the network's patch."""
        return self.network.dims

    @property
    def patch_size(self) -> tuple[int, ...]:
        """Training patch of this network, voxels."""
        return tuple(self.network.patch_size)

    @property
    def batch_size(self) -> int:
        """Training batch size of this network."""
        return self.network.batch_size

    @property
    def precision(self) -> str:
        """Planned precision of this network (``fp32``, ``bf16`` or ``fp16``)."""
        return self.network.precision

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of the network's strides per patch axis."""
        return tuple(self.network.total_stride())

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """The mirrored patch axes (every axis where the plan says None)."""
        return self.configuration.resolved_mirror_axes()

    @property
    def spacing(self) -> tuple[float, ...]:
        """Target spacing of the configuration's preprocessed data, ``(Z, Y, X)`` mm."""
        return tuple(self.configuration.spacing)

    @property
    def previous_stage(self) -> str | None:
        """For a cascade, the configuration whose prediction enters as input channels; else None."""
        return self.configuration.previous_stage
