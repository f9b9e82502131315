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

Options (``net.options``), besides the encoder's ``output_stride`` (default 8) and ``blocks_per_stage``
(see :class:`~medseg.networks.dilated.DilatedSegmentationNetwork`):
    bins (list of ints, default [1, 2, 3, 6]).
    psp_channels (int, default max(8, deepest features // 2)): channels after fusion.
    dropout (float, default 0.1): dropout before the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.networks.dilated import DilatedSegmentationNetwork, bottleneck_size, pooled_context
from medseg.networks.layers import LEAKY_SLOPE, ConvNormAct, conv_type, options_get, options_positive_ints
from medseg.networks.registry import register_network
from medseg.networks.spec import NetworkSpec


def pyramid_bins(bins: Sequence[int], feature_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-axis output size of each pyramid level: ``min(bin, feature size)`` per axis."""
    return [tuple(min(b, n) for n in feature_size) for b in bins]


class PyramidPooling(nn.Module):
    """Average-pool to each bin grid, 1x1 convolution + LeakyReLU, upsample, concatenate with the input
    (one :func:`~medseg.networks.dilated.pooled_context` branch per bin grid, no normalisation)."""

    def __init__(self, dims: int, in_channels: int, branch_channels: int, bins: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.bins = [tuple(b) for b in bins]
        self.convs = nn.ModuleList(conv_type(dims)(in_channels, branch_channels, 1) for _ in self.bins)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [pooled_context(x, b, conv, self.act) for b, conv in zip(self.bins, self.convs)]
        return torch.cat([x, *pooled], dim=1)


@register_network("psp")
class PSPNet(DilatedSegmentationNetwork):
    """PSPNet for 2D/3D patches. Input ``(B, C, *spatial)``, output logits ``(B, K, *spatial)``;
    ``spatial`` must be divisible by ``size_divisor`` (the encoder's accumulated stride)."""

    def __init__(
        self, net: NetworkSpec, in_channels: int, num_classes: int, patch_size: Sequence[int] | None = None
    ) -> None:
        output_stride = self.read_encoder_options(net, ("bins", "psp_channels", "dropout"), 8)
        bins = options_positive_ints(net, "bins", (1, 2, 3, 6))
        super().__init__(net, in_channels, num_classes, output_stride)
        d = net.dims
        feats = self.encoder.features
        fuse_c = options_get(net, "psp_channels", max(8, feats[-1] // 2), int)
        dropout = options_get(net, "dropout", 0.1, float)
        branch_c = max(4, feats[-1] // len(bins))

        bottleneck = bottleneck_size(patch_size, self.size_divisor)
        self.ppm = PyramidPooling(d, feats[-1], branch_c, pyramid_bins(bins, bottleneck))
        self.fuse = ConvNormAct(d, feats[-1] + branch_c * len(bins), fuse_c, net.kernel_sizes[-1], norm=net.norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = conv_type(d)(fuse_c, num_classes, 1)
        self._add_aux_head_and_init(net, num_classes)

    def head(self, bottom: torch.Tensor) -> torch.Tensor:
        """Pyramid pooling on the deepest features, fused and classified, at the deepest resolution."""
        logits: torch.Tensor = self.classifier(self.dropout(self.fuse(self.ppm(bottom))))
        return logits
