"""``deeplab``: DeepLabv3+ (Chen et al. 2018, "Encoder-Decoder with Atrous Separable Convolution").

Encoder: :class:`~medseg.networks.dilated.DilatedResidualEncoder` with ``output_stride`` (per axis).
ASPP on the deepest features: a 1x1 branch, three atrous branches and an image-level pooling branch,
concatenated and projected. The paper's rates (6, 12, 18) were chosen for a 33-voxel-wide feature map
(513 px crops at output stride 16); here each axis scales them to its own bottleneck size
``n`` (``rate = max(1, round(r * n / 33))``), and an axis whose rate reaches ``n`` -- where every tap but
the centre would fall into the zero padding -- gets kernel size 1 on that axis, exactly as the DeepLabv3
paper observes; a branch degraded along every axis is a plain 1x1 convolution. Decoder: the ASPP output
is upsampled to one low-level skip (``low_level_stage``), fused with its 1x1 projection by two
convolutions, classified, and upsampled to the input size.

Deep supervision (training mode): ``[main logits (full resolution), auxiliary logits]``, the auxiliary
head sitting on the encoder stage before the deepest one at that stage's resolution (``output_scales``).

Options (``net.options``), besides the encoder's ``output_stride`` (default 16) and ``blocks_per_stage``
(see :class:`~medseg.networks.dilated.DilatedSegmentationNetwork`):
    separable (bool, default False): depthwise-separable convolutions in the ASPP and the decoder.
    aspp_rates (list of 3 ints, default [6, 12, 18]): rates at the reference 33-voxel feature map.
    aspp_channels (int, default min(256, deepest features)).
    low_level_stage (int, default min(2, num_stages - 1)).
    low_level_channels (int, default max(8, 3 * aspp_channels // 16)).
    dropout (float, default 0.1): dropout after the ASPP projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medseg.networks.dilated import DilatedSegmentationNetwork, bottleneck_size, pooled_context
from medseg.networks.layers import LEAKY_SLOPE, ConvNormAct, conv_type, options_get, options_positive_ints, upsample_to
from medseg.networks.registry import register_network
from medseg.networks.spec import NetworkSpec

#: Feature-map width the paper's ASPP rates were designed for (513 / 16, rounded up).
REFERENCE_FEATURE_SIZE = 33


def aspp_branch_geometry(
    rates: Sequence[int], feature_size: Sequence[int], kernel: Sequence[int]
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Kernel and dilation per axis of each atrous branch.

    Args:
        rates: the rates at the reference feature size (e.g. ``(6, 12, 18)``).
        feature_size: bottleneck spatial size per axis.
        kernel: the plan's kernel size at the bottleneck stage (an axis with kernel 1 stays 1).

    Returns:
        One ``(kernel, dilation)`` pair per rate.
    """
    out = []
    for r in rates:
        ks, ds = [], []
        for n, k in zip(feature_size, kernel):
            rate = max(1, int(r * n / REFERENCE_FEATURE_SIZE + 0.5))
            if k == 1 or rate >= n:
                ks.append(1)
                ds.append(1)
            else:
                ks.append(3)
                ds.append(rate)
        out.append((tuple(ks), tuple(ds)))
    return out


class ImagePooling(nn.Module):
    """Image-level features: global average pool, 1x1 convolution, LeakyReLU, broadcast back (a
    :func:`~medseg.networks.dilated.pooled_context` branch of one cell, no normalisation)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_type(dims)(in_channels, out_channels, 1)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_context(x, (1,) * (x.dim() - 2), self.conv, self.act)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with rates adapted per axis to the feature size."""

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        feature_size: Sequence[int],
        kernel: Sequence[int],
        rates: Sequence[int],
        norm: str,
        separable: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.geometry = aspp_branch_geometry(rates, feature_size, kernel)
        branches: list[nn.Module] = [ConvNormAct(dims, in_channels, out_channels, 1, norm=norm)]
        for k, dil in self.geometry:
            branches.append(ConvNormAct(dims, in_channels, out_channels, k, 1, dil, norm, separable=separable))
        branches.append(ImagePooling(dims, in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = ConvNormAct(dims, out_channels * len(branches), out_channels, 1, norm=norm)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.dropout(self.project(torch.cat([b(x) for b in self.branches], dim=1)))
        return y


@register_network("deeplab")
class DeepLabV3Plus(DilatedSegmentationNetwork):
    """DeepLabv3+ for 2D/3D patches. Input ``(B, C, *spatial)``, output logits ``(B, K, *spatial)``;
    ``spatial`` must be divisible by ``size_divisor`` (the encoder's accumulated stride)."""

    def __init__(
        self, net: NetworkSpec, in_channels: int, num_classes: int, patch_size: Sequence[int] | None = None
    ) -> None:
        output_stride = self.read_encoder_options(
            net, ("separable", "aspp_rates", "aspp_channels", "low_level_stage", "low_level_channels", "dropout"), 16
        )
        separable = options_get(net, "separable", False, bool)
        rates = options_positive_ints(net, "aspp_rates", (6, 12, 18), count=3)
        super().__init__(net, in_channels, num_classes, output_stride)
        d, S = net.dims, net.num_stages
        feats = self.encoder.features
        aspp_c = options_get(net, "aspp_channels", min(256, feats[-1]), int)
        low_stage = options_get(net, "low_level_stage", min(2, S - 1), int, range(S))
        low_c = options_get(net, "low_level_channels", max(8, 3 * aspp_c // 16), int)
        dropout = options_get(net, "dropout", 0.1, float)

        self.low_level_stage = low_stage
        self.head_stages = (-1, low_stage)
        self.aspp = ASPP(
            d,
            feats[-1],
            aspp_c,
            bottleneck_size(patch_size, self.size_divisor),
            net.kernel_sizes[-1],
            rates,
            net.norm,
            separable,
            dropout,
        )
        self.low_level = ConvNormAct(d, feats[low_stage], low_c, 1, norm=net.norm)
        k_low = net.kernel_sizes[low_stage]
        self.decoder = nn.Sequential(
            ConvNormAct(d, aspp_c + low_c, aspp_c, k_low, norm=net.norm, separable=separable),
            ConvNormAct(d, aspp_c, aspp_c, k_low, norm=net.norm, separable=separable),
        )
        self.classifier = conv_type(d)(aspp_c, num_classes, 1)
        self._add_aux_head_and_init(net, num_classes)

    def head(self, bottom: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """ASPP on the deepest features, fused with the low-level skip; logits at the skip's resolution."""
        y = self.aspp(bottom)
        y = torch.cat((upsample_to(y, low.shape[2:]), self.low_level(low)), dim=1)
        logits: torch.Tensor = self.classifier(self.decoder(y))
        return logits
