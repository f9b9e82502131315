"""Normalisation layers of the networks' convolution blocks (instance, batch, group), 2D and 3D.

Tensors are ``(B, C, Y, X)`` or ``(B, C, Z, Y, X)``; :class:`InstanceNorm` also takes channels-last inputs
on the CPU through its own autograd function, and works under autocast.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg.options import DeviceKind, NormLayer

__all__ = ["InstanceNorm", "make_norm"]


class InstanceNorm(nn.GroupNorm):
    """Instance normalisation with a learned per-channel scale and shift.

    Same maths as ``nn.InstanceNorm{2,3}d(C, affine=True)`` (statistics per sample and channel over the
    spatial axes, no running statistics), implemented as ``GroupNorm`` with one group per channel: on the
    CPU that kernel keeps channels-last tensors channels-last (instance norm would copy them to the
    default layout and back) and accepts bfloat16 inputs under autocast. Parameters are ``weight`` and
    ``bias`` of shape ``(C,)`` like the instance-norm modules'.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_channels, num_channels, eps=eps, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype == torch.float32
            and x.device.type == DeviceKind.CPU
            and x.dim() in (4, 5)
            and torch.is_grad_enabled()
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
        ):
            # torch's Function.apply is unannotated (returns what forward returns: a tensor)
            y: torch.Tensor = _ChannelsLastInstanceNorm.apply(  # type: ignore[no-untyped-call]
                x, self.weight, self.bias, self.eps
            )
            return y
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine=True"


class _ChannelsLastInstanceNorm(torch.autograd.Function):
    """Instance norm of a channels-last float32 CPU tensor with a backward pass suited to that layout.

    PyTorch's CPU group-norm backward with one channel per group is 3-5x slower on channels-last tensors
    than on contiguous ones; these few vectorised passes (reductions over the outer, spatial axes keep the
    channel axis innermost) are not. Forward is PyTorch's kernel. Gradients (biased variance, ``N``
    voxels per sample and channel, ``x_hat`` the normalised input, ``r`` the inverse std)::

        d_bias = sum(g),  d_weight = sum(g * x_hat),
        d_x = weight * r * (g - mean_N(g) - x_hat * mean_N(g * x_hat))
    """

    # ctx is Any: torch's stubs leave save_for_backward unannotated and type saved_tensors as a 1-tuple
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        n, c = x.shape[:2]
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, math.prod(x.shape[2:]), c, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, None]:
        x, weight, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        voxels = math.prod(x.shape[2:])
        stats = (n, c) + (1,) * (x.dim() - 2)
        axes = tuple(range(2, x.dim()))
        r = rstd.view(stats)
        x_hat = (x - mean.view(stats)).mul_(r)
        sum_g = grad.sum(axes, keepdim=True)
        sum_gx = (grad * x_hat).sum(axes, keepdim=True)
        d_weight = sum_gx.sum(0).flatten()
        d_bias = sum_g.sum(0).flatten()
        d_x: torch.Tensor | None = None
        if ctx.needs_input_grad[0]:
            correction = x_hat.mul_(sum_gx / voxels).add_(sum_g / voxels)  # reuses x_hat's memory
            d_x = torch.sub(grad, correction, out=correction).mul_(weight.view((1, c) + stats[2:]) * r)
        return d_x, d_weight, d_bias, None


def make_norm(kind: str, channels: int, dims: int, groups: int = 8) -> nn.Module:
    """Normalisation layer by name.

    Args:
        kind: ``"instance"`` (default of every plan; affine), ``"batch"`` or ``"group"``.
        channels: number of channels ``C``.
        dims: 2 or 3 spatial dimensions.
        groups: for ``"group"``, the wanted number of groups; the largest divisor of ``C`` not above it
            is used.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == NormLayer.INSTANCE:
        return InstanceNorm(channels)
    if kind == NormLayer.BATCH:
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](channels)
    if kind == NormLayer.GROUP:
        g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
        return nn.GroupNorm(g, channels, eps=1e-5, affine=True)
    raise ValueError(f"norm must be one of instance, batch, group; got {kind!r}")
