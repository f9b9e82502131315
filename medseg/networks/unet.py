"""``unet``: U-Net (Ronneberger et al. 2015) in the plain configurable form nnU-Net popularised.

Encoder: one stage per entry of ``net.strides``; stage ``s`` holds ``n_conv_per_stage`` convolutions
with kernel ``kernel_sizes[s]``, the first of them strided by ``strides[s]`` (no pooling layers), and
``features_per_stage()[s]`` channels. Decoder: per stage, a transposed convolution (kernel = stride =
``strides[s]``) upsamples, the encoder's skip is concatenated, and two convolutions fuse them; a 1x1
convolution head produces logits.

Deep supervision (training mode, ``net.deep_supervision``): the forward pass returns one logits tensor
per decoder stage except the lowest-resolution one, full resolution first (``[full, 1/2, 1/4, ...]``
for isotropic strides of 2; ``output_scales`` gives the exact per-axis factors).

Options (``net.options``):
    residual_encoder (bool, default False): basic residual blocks in the encoder (a plain stem
        convolution, then ``blocks_per_stage`` blocks per stage).
    blocks_per_stage (int or list): residual blocks per stage (default ``max(1, n_conv_per_stage // 2)``).
    dropout (float, default 0): channel dropout after each encoder/decoder normalisation.
    full_res_features (int, default ``features_per_stage()[0]``): channels of the full-resolution stage
        (encoder stage 0 and decoder level 0) only; the other stages keep theirs. Fewer channels there
        cut the most expensive convolutions of a step (full resolution, where voxels are most numerous).
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.networks.layers import (
    ConvNormAct,
    SegmentationNetwork,
    blocks_per_stage,
    check_known_options,
    conv_transpose_type,
    conv_type,
    init_weights,
    options_get,
    plain_stage,
    residual_stage,
)
from medseg.networks.registry import register_network
from medseg.networks.spec import NetworkSpec


def supervised_levels(num_stages: int, deep_supervision: bool) -> list[int]:
    """Resolution levels that get a segmentation head: 0 (full) always; with deep supervision every
    decoder level except the lowest one (``num_stages - 2``)."""
    if not deep_supervision or num_stages <= 2:
        return [0]
    return list(range(num_stages - 2))


@register_network("unet")
class UNet(SegmentationNetwork):
    """Plain (or residual-encoder) convolutional encoder-decoder with skip connections.

    Input ``(B, C, *spatial)`` with ``spatial`` divisible by ``net.total_stride()``; output logits
    ``(B, K, *spatial)``. See the module docstring for the layout and options.
    """

    def __init__(self, net: NetworkSpec, in_channels: int, num_classes: int) -> None:
        super().__init__(net, in_channels, num_classes)
        check_known_options(net, ("residual_encoder", "blocks_per_stage", "dropout", "full_res_features"))
        d, S = net.dims, net.num_stages
        feats = list(net.features_per_stage())
        feats[0] = options_get(net, "full_res_features", feats[0], int)
        if feats[0] < 1:
            raise ValueError(f"full_res_features must be >= 1, got {feats[0]}")
        residual = options_get(net, "residual_encoder", False, bool)
        dropout = options_get(net, "dropout", 0.0, float)

        self.encoder = nn.ModuleList()
        if residual:
            n_blocks = blocks_per_stage(net)
            for s in range(S):
                self.encoder.append(
                    residual_stage(
                        d,
                        in_channels if s == 0 else feats[s - 1],
                        feats[s],
                        net.kernel_sizes[s],
                        net.strides[s],
                        n_blocks[s],
                        net.norm,
                        stem=(s == 0),
                        dropout=dropout,
                    )
                )
        else:
            for s in range(S):
                self.encoder.append(
                    plain_stage(
                        d,
                        in_channels if s == 0 else feats[s - 1],
                        feats[s],
                        net.kernel_sizes[s],
                        net.strides[s],
                        net.n_conv_per_stage,
                        net.norm,
                        dropout,
                    )
                )

        # decoder modules indexed by the level they produce: level l = s - 1 upsampled from stage s
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        convt = conv_transpose_type(d)
        for lvl in range(S - 1):
            s = lvl + 1
            self.upsample.append(convt(feats[s], feats[lvl], net.strides[s], net.strides[s], bias=False))
            self.decoder.append(
                nn.Sequential(
                    ConvNormAct(d, 2 * feats[lvl], feats[lvl], net.kernel_sizes[lvl], norm=net.norm, dropout=dropout),
                    ConvNormAct(d, feats[lvl], feats[lvl], net.kernel_sizes[lvl], norm=net.norm, dropout=dropout),
                )
            )
        levels = supervised_levels(S, net.deep_supervision)
        self.heads = nn.ModuleList(conv_type(d)(feats[lvl], num_classes, 1) for lvl in levels)

        cum = [(1,) * d]
        for s in range(1, S):
            cum.append(tuple(c * st for c, st in zip(cum[-1], net.strides[s])))
        self.output_scales = [cum[lvl] for lvl in levels]
        init_weights(self)

    def _forward(self, x: torch.Tensor, with_aux: bool) -> list[torch.Tensor]:
        skips: list[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        n_heads = len(self.heads) if with_aux else 1
        outs: list[torch.Tensor] = [x] * n_heads  # placeholders, replaced below
        for lvl in range(len(self.decoder) - 1, -1, -1):
            x = self.upsample[lvl](x)
            x = self.decoder[lvl](torch.cat((x, skips[lvl]), dim=1))
            if lvl < n_heads:
                outs[lvl] = self.heads[lvl](x)
        if not self.decoder:  # single-stage topology: no downsampling, no decoder
            outs[0] = self.heads[0](x)
        return outs
