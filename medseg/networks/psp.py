"""``psp``: Pyramid Scene Parsing Network (Zhao et al. 2017).

Encoder: :class:`~medseg.networks.dilated.DilatedResidualEncoder` with ``output_stride`` (default 8, as
in the paper). Pyramid pooling module on the deepest features: average pooling to ``bins`` (1, 2, 3, 6)
cells per axis, each followed by a 1x1 convolution and upsampled back; an axis shorter than a bin count
pools to its own length instead (bins are clamped per axis, so a 5-voxel-deep bottleneck pools to
1, 2, 3 and 5 cells along depth). The pooled context is concatenated with the features, fused by a
convolution, classified and upsampled (linear interpolation) to the input size.

Deep supervision (training mode): ``[main logits (full resolution), auxiliary logits]``, the auxiliary
head (the paper's "deep supervision" loss on res4b22) on the encoder stage before the deepest one, at
that stage's resolution (``output_scales``).

Options (``net.options``):
    output_stride (int, 8 or 16, default 8).
    bins (list of ints, default [1, 2, 3, 6]).
    psp_channels (int, default max(8, deepest features // 2)): channels after fusion.
    dropout (float, default 0.1): dropout before the classifier.
    blocks_per_stage (int or list): residual blocks per encoder stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.networks.dilated import AuxHead, DilatedResidualEncoder, bottleneck_size
from medseg.networks.layers import (
    LEAKY_SLOPE,
    ConvNormAct,
    SegmentationNetwork,
    adaptive_avg_pool,
    check_known_options,
    conv_type,
    init_weights,
    options_get,
    upsample_to,
)
from medseg.networks.registry import register_network
from medseg.planning.plan import NetworkPlan


def pyramid_bins(bins: Sequence[int], feature_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-axis output size of each pyramid level: ``min(bin, feature size)`` per axis."""
    return [tuple(min(b, n) for n in feature_size) for b in bins]


class PyramidPooling(nn.Module):
    """Average-pool to each bin grid, 1x1 convolution + LeakyReLU, upsample, concatenate with the input.

    No normalisation inside the pooled branches: statistics over 1..36 cells are meaningless (zero for
    the 1-cell level under instance norm).
    """

    def __init__(self, dims: int, in_channels: int, branch_channels: int, bins: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.bins = [tuple(b) for b in bins]
        self.convs = nn.ModuleList(conv_type(dims)(in_channels, branch_channels, 1) for _ in self.bins)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pooled = [
            upsample_to(self.act(conv(adaptive_avg_pool(x, b))), size) for b, conv in zip(self.bins, self.convs)
        ]
        return torch.cat([x, *pooled], dim=1)


@register_network("psp")
class PSPNet(SegmentationNetwork):
    """PSPNet for 2D/3D patches. Input ``(B, C, *spatial)``, output logits ``(B, K, *spatial)``;
    ``spatial`` must be divisible by ``size_divisor`` (the encoder's accumulated stride)."""

    def __init__(self, net: NetworkPlan, in_channels: int, num_classes: int) -> None:
        super().__init__(net, in_channels, num_classes)
        check_known_options(net, ("output_stride", "bins", "psp_channels", "dropout", "blocks_per_stage"))
        d, S = net.dims, net.num_stages
        output_stride = options_get(net, "output_stride", 8, int, (8, 16))
        bins = tuple(net.options.get("bins", (1, 2, 3, 6)))
        if not bins or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in bins):
            raise ValueError(f"options.bins must be a non-empty list of positive integers, got {list(bins)}")
        self.encoder = DilatedResidualEncoder(net, in_channels, output_stride)
        feats = self.encoder.features
        acc = self.encoder.accumulated_strides
        fuse_c = options_get(net, "psp_channels", max(8, feats[-1] // 2), int)
        dropout = options_get(net, "dropout", 0.1, float)
        branch_c = max(4, feats[-1] // len(bins))

        self.ppm = PyramidPooling(d, feats[-1], branch_c, pyramid_bins(bins, bottleneck_size(net.patch_size, acc[-1])))
        self.fuse = ConvNormAct(d, feats[-1] + branch_c * len(bins), fuse_c, net.kernel_sizes[-1], norm=net.norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = conv_type(d)(fuse_c, num_classes, 1)
        self.size_divisor = acc[-1]
        self.aux = None
        if net.deep_supervision and S >= 2:
            self.aux = AuxHead(d, feats[-2], num_classes, net.kernel_sizes[-2], net.norm)
            self.output_scales = [(1,) * d, acc[-2]]
        init_weights(self)

    def _forward(self, x: torch.Tensor, with_aux: bool) -> list[torch.Tensor]:
        size = x.shape[2:]
        feats = self.encoder(x)
        bottom = feats[-1]
        aux_in = feats[-2] if with_aux and self.aux is not None else None
        del feats
        y = self.classifier(self.dropout(self.fuse(self.ppm(bottom))))
        outs = [upsample_to(y, size)]
        if aux_in is not None:
            outs.append(self.aux(aux_in))
        return outs
