"""Residual encoder whose deepest stages trade striding for dilation, and the network base built on it
(shared by ``deeplab`` and ``psp``).

Following DeepLab (Chen et al. 2017) and PSPNet (Zhao et al. 2017): once the accumulated stride along
an axis would exceed ``output_stride``, later stages stop striding along that axis and dilate their
convolutions by the stride they would have had instead, so the receptive field keeps growing while the
feature map keeps its resolution. This is done per axis: for anisotropic topologies an axis the plan
never strides keeps stride 1 and dilation 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from medseg.networks.layers import (
    ConvNormAct,
    SegmentationNetwork,
    adaptive_avg_pool,
    blocks_per_stage,
    check_known_options,
    conv_type,
    init_weights,
    options_get,
    residual_stage,
    upsample_to,
)
from medseg.networks.spec import NetworkSpec


def dilated_topology(
    strides: Sequence[Sequence[int]], output_stride: int
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Per stage: effective stride, dilation and accumulated stride (w.r.t. the input).

    Args:
        strides: the plan's per-stage, per-axis strides (stage 0 all ones).
        output_stride: the largest accumulated stride allowed per axis.

    Returns:
        ``(effective_strides, dilations, accumulated_strides)``, one tuple per stage each.
    """
    dims = len(strides[0])
    acc = [1] * dims
    dil = [1] * dims
    eff_all, dil_all, acc_all = [], [], []
    for st in strides:
        eff = []
        for a in range(dims):
            if acc[a] * st[a] <= output_stride:
                eff.append(st[a])
                acc[a] *= st[a]
            else:
                eff.append(1)
                dil[a] *= st[a]
        eff_all.append(tuple(eff))
        dil_all.append(tuple(dil))
        acc_all.append(tuple(acc))
    return eff_all, dil_all, acc_all


class DilatedResidualEncoder(nn.Module):
    """Residual encoder (a plain stem convolution, then basic residual blocks), dilated past
    ``output_stride``.

    ``forward(x)`` returns the feature map of every stage, ``(B, features[s], *spatial / accumulated[s])``.

    Attributes:
        features: channels per stage.
        accumulated_strides: per stage, per axis downsampling w.r.t. the input.
        dilations: per stage, per axis dilation of its convolutions.
    """

    def __init__(self, net: NetworkSpec, in_channels: int, output_stride: int) -> None:
        super().__init__()
        d = net.dims
        self.features = net.features_per_stage()
        eff, self.dilations, self.accumulated_strides = dilated_topology(net.strides, output_stride)
        n_blocks = blocks_per_stage(net)
        self.stages = nn.ModuleList(
            residual_stage(
                d,
                in_channels if s == 0 else self.features[s - 1],
                self.features[s],
                net.kernel_sizes[s],
                eff[s],
                n_blocks[s],
                net.norm,
                dilation=self.dilations[s],
                stem=(s == 0),
            )
            for s in range(net.num_stages)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class AuxHead(nn.Sequential):
    """Auxiliary classifier for deep supervision: conv-norm-act then a 1x1 convolution to logits."""

    def __init__(self, dims: int, in_channels: int, num_classes: int, kernel: Sequence[int], norm: str) -> None:
        mid = max(in_channels // 2, 8)
        super().__init__(
            ConvNormAct(dims, in_channels, mid, kernel, norm=norm),
            conv_type(dims)(mid, num_classes, 1),
        )


def pooled_context(x: torch.Tensor, cells: Sequence[int], conv: nn.Module, act: nn.Module) -> torch.Tensor:
    """A pooled-context branch (ASPP's image pooling, PSP's pyramid levels): ``x`` ``(B, C, *spatial)``
    average-pooled to ``cells`` per axis, then ``conv`` (1x1) and ``act``, resized back to ``spatial``
    (a broadcast view for a single cell).

    The branches carry no normalisation: statistics over a few cells are meaningless (zero for a single
    cell under instance norm).
    """
    return upsample_to(act(conv(adaptive_avg_pool(x, cells))), x.shape[2:])


def bottleneck_size(patch_size: Sequence[int] | None, accumulated: Sequence[int]) -> tuple[int, ...]:
    """Spatial size of the deepest feature map for the training patch ``patch_size`` (voxels per axis).

    The pooled-context heads (ASPP rates, pyramid bins) are sized for it, so these architectures need
    the patch they are trained on, not only their topology.

    Raises:
        ValueError: ``patch_size`` is None.
    """
    if patch_size is None:
        raise ValueError("this architecture sizes its context head for the training patch; pass patch_size")
    return tuple(max(1, p // a) for p, a in zip(patch_size, accumulated))


class DilatedSegmentationNetwork(SegmentationNetwork):
    """Base of ``deeplab`` and ``psp``: a :class:`DilatedResidualEncoder`, a context head on some of its
    stages, the head's logits upsampled (linear interpolation) to the input size, and in training mode with
    deep supervision an :class:`AuxHead` on the stage before the deepest one, at that stage's resolution.

    A subclass reads its options after :meth:`read_encoder_options`, calls
    ``super().__init__(net, in_channels, num_classes, output_stride)``, builds its head modules, sets
    ``head_stages`` (the encoder stages :meth:`head` takes, in its argument order) and ends with
    :meth:`_add_aux_head_and_init`; modules are registered (and initialised) encoder, head, aux head.
    Input ``(B, C, *spatial)`` with ``spatial`` divisible by ``size_divisor`` (the encoder's accumulated
    stride), output logits ``(B, K, *spatial)``.

    Encoder options (``net.options``), shared by every subclass:
        output_stride (int, 8 or 16; the default is the subclass's).
        blocks_per_stage (int or list): residual blocks per encoder stage.
    """

    head_stages: tuple[int, ...] = (-1,)
    #: Logits ``(B, K, *spatial')`` from the feature maps of ``head_stages`` (one argument per stage, in that
    #: order), at any resolution; each subclass defines it as a method with its own arity.
    head: Callable[..., torch.Tensor]

    @staticmethod
    def read_encoder_options(net: NetworkSpec, head_options: Sequence[str], default_output_stride: int) -> int:
        """Refuse option keys that are neither the encoder's nor in ``head_options``; return ``output_stride``.

        Raises:
            ValueError: an unknown option key, or ``output_stride`` not 8 or 16.
        """
        check_known_options(net, ("output_stride", *head_options, "blocks_per_stage"))
        return options_get(net, "output_stride", default_output_stride, int, (8, 16))

    def __init__(self, net: NetworkSpec, in_channels: int, num_classes: int, output_stride: int) -> None:
        super().__init__(net, in_channels, num_classes)
        self.encoder = DilatedResidualEncoder(net, in_channels, output_stride)
        self.size_divisor = self.encoder.accumulated_strides[-1]
        self.aux: AuxHead | None = None

    def _add_aux_head_and_init(self, net: NetworkSpec, num_classes: int) -> None:
        """Add the auxiliary head (deep supervision with two or more stages), then initialise every weight."""
        if net.deep_supervision and net.num_stages >= 2:
            self.aux = AuxHead(net.dims, self.encoder.features[-2], num_classes, net.kernel_sizes[-2], net.norm)
            self.output_scales = [(1,) * net.dims, self.encoder.accumulated_strides[-2]]
        init_weights(self)

    def _forward(self, x: torch.Tensor, with_aux: bool) -> list[torch.Tensor]:
        size = x.shape[2:]
        feats = self.encoder(x)
        head_in = [feats[s] for s in self.head_stages]
        aux_in = feats[-2] if with_aux and self.aux is not None else None
        del feats  # let unused stage outputs go early when gradients are off
        outs = [upsample_to(self.head(*head_in), size)]
        if aux_in is not None and self.aux is not None:
            outs.append(self.aux(aux_in))
        return outs
