"""``segresnet``, ``swinunetr`` and ``dynunet``: MONAI's networks (Auto3DSeg's templates), built from a medseg topology.

The modules are MONAI's own classes (``monai.networks.nets``), constructed from the
:class:`~medseg.networks.spec.NetworkSpec` and wrapped in a :class:`~medseg.networks.layers.SegmentationNetwork`
so that they take the same arguments, check their input the same way and switch deep supervision the same way
as medseg's own networks. A MONAI network accepts fewer topologies than medseg's U-Net; each class therefore
says which spec it accepts (:meth:`MonaiNetwork.topology_problems`) and which accepted spec is nearest to a
planned one (:meth:`MonaiNetwork.accepted_spec`, what the planner records). Mapping of the spec:

``segresnet`` -- ``monai.networks.nets.SegResNetDS`` (Myronenko 2018, the Auto3DSeg template):
    one level per stage (``blocks_down`` 1, 2, 2, 4, 4, ...; ``blocks_up`` 1 per decoder level), ``init_filters =
    base_features`` doubled per level (MONAI's rule: ``max_features`` is recorded as ``base_features *
    2**(stages - 1)``), ReLU, the spec's norm. MONAI derives the per-level strides and kernels from a voxel
    spacing (``resolution``): axes finer than the coarsest by ``2**n`` are halved alone for ``n`` levels, then every
    axis at every level; kernels are 3 along halved axes and 1 along the others. The planned strides are kept
    when some spacing gives them, else the deepest stages are dropped until one does (the planner's topology
    stops halving an axis that runs out of voxels, MONAI's schedule never does). Deep supervision: a head on every
    decoder level (Auto3DSeg's ``dsdepth``).
``swinunetr`` -- ``monai.networks.nets.SwinUNETR`` (Hatamizadeh et al. 2022): a fixed topology of five isotropic
    halvings (every patch axis a multiple of 32), ``feature_size = base_features``, which MONAI requires to be a
    multiple of 12 (the planner rounds to the nearest one). No deep supervision.
``dynunet`` -- ``monai.networks.nets.DynUNet`` (MONAI's nnU-Net): the planned kernels and strides as they are,
    ``filters = features_per_stage()``, LeakyReLU(0.01), the spec's norm; ``options.residual`` (bool) picks
    residual blocks. Deep supervision: ``stages - 2`` auxiliary heads, which DynUNet upsamples to full resolution.

Tensors are ``(B, C, Z, Y, X)`` (``(B, C, Y, X)`` in 2D); logits ``(B, K, *spatial)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from monai.networks.nets import DynUNet, SegResNetDS, SwinUNETR
from monai.networks.nets.segresnet_ds import aniso_kernel, scales_for_resolution
from torch import nn

from medseg.networks.layers import SegmentationNetwork, check_known_options, options_get
from medseg.networks.registry import register_network
from medseg.networks.spec import NetworkSpec
from medseg.options import NormLayer

#: SegResNetDS residual blocks per encoder level (Auto3DSeg's 1, 2, 2, 4, 4; deeper levels keep 4).
SEGRESNET_BLOCKS = (1, 2, 2, 4)
#: SwinUNETR halves every axis this many times (patch embedding, then four merging stages).
SWIN_HALVINGS = 5
#: ... so every patch axis of a SwinUNETR is a multiple of this.
SWIN_MULTIPLE = 2**SWIN_HALVINGS
#: SwinUNETR's ``feature_size`` must be a multiple of this.
SWIN_FEATURE_MULTIPLE = 12


def monai_norm(norm: str, base_features: int) -> tuple[str, dict[str, Any]]:
    """MONAI's ``(name, args)`` for a :class:`~medseg.options.NormLayer` (affine instance norm; group norm with
    up to 8 groups dividing every level's channels)."""
    if norm == NormLayer.INSTANCE:
        return "instance", {"affine": True}
    if norm == NormLayer.BATCH:
        return "batch", {}
    return "group", {"num_groups": math.gcd(8, base_features)}


def cumulative_strides(strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Per stage, the per-axis downsampling factor with respect to the input."""
    out = [tuple(int(v) for v in strides[0])]
    for s in strides[1:]:
        out.append(tuple(a * int(b) for a, b in zip(out[-1], s)))
    return out


class MonaiNetwork(SegmentationNetwork):
    """A MONAI module behind medseg's network interface.

    ``forward`` takes ``(B, C, *spatial)`` (checked against ``size_divisor``) and returns logits
    ``(B, K, *spatial)``; in training mode with deep supervision the list of logits, full resolution first
    (``output_scales``).
    """

    #: The MONAI module is ``self.monai``: a tensor MONAI names ``x`` is ``monai.x`` in this network's state dict.
    MODULE_PREFIX: ClassVar[str] = "monai."

    def __init__(
        self, net: NetworkSpec, in_channels: int, num_classes: int, module: nn.Module, scales: list[tuple[int, ...]]
    ) -> None:
        super().__init__(net, in_channels, num_classes)
        self.monai = module
        self.output_scales = scales if self.deep_supervision else scales[:1]

    def _forward(self, x: torch.Tensor, with_aux: bool) -> list[torch.Tensor]:
        out = self.monai(x)
        if isinstance(out, torch.Tensor) and out.dim() == x.dim() + 1:  # DynUNet stacks its heads on axis 1
            outs = list(out.unbind(1))
        else:
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
        return outs if with_aux else outs[:1]

    @staticmethod
    def accepted_spec(spec: NetworkSpec) -> NetworkSpec:
        """The spec nearest to ``spec`` that this architecture accepts (``spec`` itself when accepted)."""
        return spec

    @staticmethod
    def topology_problems(spec: NetworkSpec, patch_size: Sequence[int] | None, where: str) -> list[str]:
        """Why this architecture cannot be built for ``spec`` and the training patch ``patch_size`` (``(Z, Y, X)``
        or ``(Y, X)``; None: any), empty when it can; each message prefixed by ``where``."""
        return []


# ------------------------------------------------------------------------------------------------ segresnet
def segresnet_resolution(strides: Sequence[Sequence[int]]) -> tuple[float, ...] | None:
    """The voxel spacing from which MONAI's SegResNetDS derives exactly ``strides`` (None: halve every axis).

    Args:
        strides: per stage, per axis stride; stage 0 is all ones, the others 1 or 2.

    Returns:
        A spacing (powers of two, coarsest axis largest) or None when every later stage halves every axis.

    Raises:
        ValueError: no spacing gives these strides (MONAI's schedule halves fine axes alone first, then all).
    """
    down = [tuple(int(v) for v in s) for s in strides[1:]]
    dims = len(strides[0])
    if all(v == 2 for s in down for v in s):
        return None
    lead = [next((i for i, s in enumerate(down) if s[a] != 2), len(down)) for a in range(dims)]
    resume = [
        next((i for i in range(lead[a], len(down)) if down[i][a] == 2), len(down))
        for a in range(dims)
        if lead[a] < len(down)
    ]
    m = max(resume)
    levels = [min(n, m) for n in lead]
    resolution = tuple(float(2 ** (m - n)) for n in levels)
    got = [tuple(int(v) for v in s) for s in scales_for_resolution(resolution, n_stages=len(strides))[: len(down)]]
    if got != down:
        raise ValueError(
            f"MONAI's SegResNetDS cannot halve the axes as the strides {[list(s) for s in strides]} do (it halves "
            "the finer axes alone first, then every axis at every level)"
        )
    return resolution


def segresnet_kernels(strides: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """Per-level kernel sizes SegResNetDS uses for ``strides`` (MONAI's ``aniso_kernel`` of its schedule)."""
    dims, n = len(strides[0]), len(strides)
    resolution = segresnet_resolution(strides)
    if resolution is None:
        return ((3,) * dims,) * n
    scales = scales_for_resolution(resolution, n_stages=n)
    return tuple(tuple(int(k) for k in aniso_kernel(s)[0]) for s in scales)


@register_network("segresnet")
class MonaiSegResNet(MonaiNetwork):
    """MONAI SegResNetDS on the planned stages (see the module docstring)."""

    def __init__(self, net: NetworkSpec, in_channels: int, num_classes: int) -> None:
        check_known_options(net, ("blocks_down",))
        problems = MonaiSegResNet.topology_problems(net, None, "segresnet")
        if problems:
            raise ValueError("; ".join(problems))
        n = net.num_stages
        blocks = options_get(net, "blocks_down", [SEGRESNET_BLOCKS[min(i, 3)] for i in range(n)], list)
        if len(blocks) != n or any(not isinstance(b, int) or b < 1 for b in blocks):
            raise ValueError(f"options.blocks_down must be {n} integers >= 1, got {blocks}")
        module = SegResNetDS(
            spatial_dims=net.dims,
            init_filters=net.base_features,
            in_channels=in_channels,
            out_channels=num_classes,
            norm=monai_norm(net.norm, net.base_features),
            blocks_down=tuple(blocks),
            dsdepth=max(1, n - 1) if net.deep_supervision else 1,
            resolution=segresnet_resolution(net.strides),
        )
        scales = cumulative_strides(net.strides)[: max(1, n - 1)]
        super().__init__(net, in_channels, num_classes, module, scales)

    @staticmethod
    def accepted_spec(spec: NetworkSpec) -> NetworkSpec:
        """The planned strides, less the deepest stages MONAI's schedule cannot take; MONAI's kernels; the
        channels of the deepest level as ``max_features``."""
        for n in range(spec.num_stages, 0, -1):
            try:
                kernels = segresnet_kernels(spec.strides[:n])
            except ValueError:
                continue
            return replace(
                spec,
                strides=tuple(spec.strides[:n]),
                kernel_sizes=kernels,
                max_features=spec.base_features * 2 ** (n - 1),
            )
        return spec  # unreachable: a single stage is always accepted

    @staticmethod
    def topology_problems(spec: NetworkSpec, patch_size: Sequence[int] | None, where: str) -> list[str]:
        try:
            kernels = segresnet_kernels(spec.strides)
        except ValueError as exc:
            return [f"{where}: {exc}"]
        if tuple(tuple(k) for k in spec.kernel_sizes) != kernels:
            return [
                f"{where}: segresnet takes its kernel sizes from its strides (MONAI's rule): kernel_sizes must be "
                f"{[list(k) for k in kernels]}, got {[list(k) for k in spec.kernel_sizes]}"
            ]
        return []


# ------------------------------------------------------------------------------------------------ swinunetr
def swin_strides(dims: int) -> tuple[tuple[int, ...], ...]:
    """SwinUNETR's fixed topology: a full-resolution stage, then :data:`SWIN_HALVINGS` isotropic halvings."""
    return ((1,) * dims,) + ((2,) * dims,) * SWIN_HALVINGS


@register_network("swinunetr")
class MonaiSwinUNETR(MonaiNetwork):
    """MONAI SwinUNETR (see the module docstring); every patch axis must be a multiple of 32."""

    def __init__(self, net: NetworkSpec, in_channels: int, num_classes: int) -> None:
        check_known_options(net, ())
        problems = MonaiSwinUNETR.topology_problems(net, None, "swinunetr")
        if problems:
            raise ValueError("; ".join(problems))
        module = SwinUNETR(
            in_channels=in_channels,
            out_channels=num_classes,
            feature_size=net.base_features,
            norm_name=monai_norm(net.norm, net.base_features),
            spatial_dims=net.dims,
        )
        super().__init__(net, in_channels, num_classes, module, [(1,) * net.dims])

    @staticmethod
    def accepted_spec(spec: NetworkSpec) -> NetworkSpec:
        """Five isotropic halvings, kernels 3, ``base_features`` rounded to a multiple of 12, no deep supervision."""
        d = spec.dims
        base = max(SWIN_FEATURE_MULTIPLE, SWIN_FEATURE_MULTIPLE * round(spec.base_features / SWIN_FEATURE_MULTIPLE))
        return replace(
            spec,
            strides=swin_strides(d),
            kernel_sizes=((3,) * d,) * (SWIN_HALVINGS + 1),
            base_features=base,
            max_features=base * 2**4,
            deep_supervision=False,
        )

    @staticmethod
    def topology_problems(spec: NetworkSpec, patch_size: Sequence[int] | None, where: str) -> list[str]:
        problems = []
        if tuple(tuple(s) for s in spec.strides) != swin_strides(spec.dims):
            problems.append(
                f"{where}: swinunetr has a fixed topology: strides must be {[list(s) for s in swin_strides(spec.dims)]} "
                "(every patch axis a multiple of 32)"
            )
        if spec.base_features % SWIN_FEATURE_MULTIPLE:
            problems.append(f"{where}: swinunetr needs base_features divisible by 12, got {spec.base_features}")
        if patch_size is not None and all(p == SWIN_MULTIPLE for p in patch_size):
            problems.append(
                f"{where}: swinunetr cannot train on patch_size {list(patch_size)}: its bottleneck would be a single "
                f"voxel, which instance norm cannot normalise; make one axis {2 * SWIN_MULTIPLE} or more"
            )
        return problems


# ------------------------------------------------------------------------------------------------ dynunet
@register_network("dynunet")
class MonaiDynUNet(MonaiNetwork):
    """MONAI DynUNet on the planned kernels and strides (see the module docstring)."""

    def __init__(self, net: NetworkSpec, in_channels: int, num_classes: int) -> None:
        check_known_options(net, ("residual",))
        n = net.num_stages
        if n < 2:
            raise ValueError("dynunet needs at least two stages")
        supervise = net.deep_supervision and n > 2
        module = DynUNet(
            spatial_dims=net.dims,
            in_channels=in_channels,
            out_channels=num_classes,
            kernel_size=[list(k) for k in net.kernel_sizes],
            strides=[list(s) for s in net.strides],
            upsample_kernel_size=[list(s) for s in net.strides[1:]],
            filters=list(net.features_per_stage()),
            norm_name=monai_norm(net.norm, net.base_features),
            deep_supervision=supervise,
            deep_supr_num=n - 2 if supervise else 1,
            res_block=options_get(net, "residual", False, bool),
        )
        # DynUNet upsamples its auxiliary heads to the input size
        super().__init__(net, in_channels, num_classes, module, [(1,) * net.dims] * (n - 1 if supervise else 1))
