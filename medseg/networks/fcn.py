"""``fcn``: FCN-8s-style skip fusion (Long, Shelhamer and Darrell 2015), the classic baseline.

Encoder: plain convolutional stages as in ``unet`` (``n_conv_per_stage`` convolutions per stage, the
first strided). Each of the three deepest stages gets a 1x1 "score" layer producing logits; starting from
the deepest, scores are upsampled (linear interpolation) to the next shallower scored stage and added to
its score, and the last sum is upsampled to the input size. With fewer than three stages, all of them are
fused.

Deep supervision (training mode): ``[full resolution, fused scores at the shallower fusion levels ...]``,
every fused score except the deepest (unfused) one, decreasing resolution (``output_scales``).

Options (``net.options``):
    fused_stages (int, default 3): how many of the deepest stages are scored and fused (3 = FCN-8s).
    dropout (float, default 0): channel dropout after each normalisation.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.networks.layers import (
    SegmentationNetwork,
    check_known_options,
    conv_type,
    init_weights,
    options_get,
    plain_stage,
    upsample_to,
)
from medseg.networks.registry import register_network
from medseg.networks.spec import NetworkSpec


@register_network("fcn")
class FCN(SegmentationNetwork):
    """FCN with skip fusion for 2D/3D patches. Input ``(B, C, *spatial)`` with ``spatial`` divisible by
    ``net.total_stride()``, output logits ``(B, K, *spatial)``."""

    def __init__(self, net: NetworkSpec, in_channels: int, num_classes: int) -> None:
        super().__init__(net, in_channels, num_classes)
        check_known_options(net, ("fused_stages", "dropout"))
        d, S = net.dims, net.num_stages
        feats = net.features_per_stage()
        n_fused = min(S, options_get(net, "fused_stages", 3, int))
        if n_fused < 1:
            raise ValueError(f"options.fused_stages must be >= 1, got {n_fused}")
        dropout = options_get(net, "dropout", 0.0, float)
        self.encoder = nn.ModuleList(
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
            for s in range(S)
        )
        #: scored stages, deepest first
        self.fused = list(range(S - 1, S - 1 - n_fused, -1))
        self.scores = nn.ModuleList(conv_type(d)(feats[s], num_classes, 1) for s in self.fused)

        cum = [(1,) * d]
        for s in range(1, S):
            cum.append(tuple(c * st for c, st in zip(cum[-1], net.strides[s])))
        # supervised fused levels, shallowest first, excluding the deepest unfused score and level 0
        # (which is the full-resolution output itself)
        self._aux_stages = [s for s in reversed(self.fused[1:]) if s > 0] if net.deep_supervision else []
        self.output_scales = [(1,) * d] + [cum[s] for s in self._aux_stages]
        init_weights(self)

    def _forward(self, x: torch.Tensor, with_aux: bool) -> list[torch.Tensor]:
        size = x.shape[2:]
        feats: list[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            feats.append(x)
        fused: dict[int, torch.Tensor] = {}
        y = self.scores[0](feats[self.fused[0]])
        for score, s in zip(self.scores[1:], self.fused[1:]):
            y = upsample_to(y, feats[s].shape[2:]) + score(feats[s])
            fused[s] = y
        outs = [upsample_to(y, size)]
        if with_aux:
            outs += [fused[s] for s in self._aux_stages]
        return outs
