"""Residual encoder whose deepest stages trade striding for dilation (shared by ``deeplab`` and ``psp``).

Following DeepLab (Chen et al. 2017) and PSPNet (Zhao et al. 2017): once the accumulated stride along
an axis would exceed ``output_stride``, later stages stop striding along that axis and dilate their
convolutions by the stride they would have had instead, so the receptive field keeps growing while the
feature map keeps its resolution. This is done per axis: for anisotropic topologies an axis the plan
never strides keeps stride 1 and dilation 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.networks.layers import ConvNormAct, blocks_per_stage, conv_type, residual_stage
from medseg.planning.plan import NetworkPlan


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

    def __init__(self, net: NetworkPlan, in_channels: int, output_stride: int) -> None:
        super().__init__()
        d = net.dims
        self.features = net.features_per_stage()
        eff, self.dilations, self.accumulated_strides = dilated_topology(net.strides, output_stride)
        n_blocks = blocks_per_stage(net)
        self.stages = nn.ModuleList(
            residual_stage(
                d, in_channels if s == 0 else self.features[s - 1], self.features[s], net.kernel_sizes[s],
                eff[s], n_blocks[s], net.norm, dilation=self.dilations[s], stem=(s == 0),
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


def bottleneck_size(patch_size: Sequence[int], accumulated: Sequence[int]) -> tuple[int, ...]:
    """Spatial size of the deepest feature map for the planned patch."""
    return tuple(max(1, p // a) for p, a in zip(patch_size, accumulated))
