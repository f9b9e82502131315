"""Building blocks shared by every architecture, for 2D and 3D from one code path.

The number of spatial dimensions (2 or 3, the length of each ``spec.strides`` entry) picks the
convolution, transposed convolution and dropout classes; everything else is written once. Tensors are
``(B, C, Y, X)`` or ``(B, C, Z, Y, X)``. All blocks work with ``torch.channels_last``/``torch.channels_last_3d`` inputs and
under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (and CUDA autocast).

The normalisation layers are :mod:`medseg.networks.norms`'s.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from medseg.networks.norms import make_norm
from medseg.networks.spec import NetworkSpec
from medseg.options import NormLayer

#: Negative slope of every LeakyReLU.
LEAKY_SLOPE = 0.01

_T = TypeVar("_T")


class ConvClass(Protocol):
    """``nn.Conv2d``/``nn.Conv3d`` as :func:`conv_type` hands it out: per-axis sizes are an int or a tuple
    with one entry per spatial axis (the class is picked to match ``dims``)."""

    def __call__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = ...,
        padding: int | tuple[int, ...] = ...,
        dilation: int | tuple[int, ...] = ...,
        groups: int = ...,
        bias: bool = ...,
    ) -> nn.Conv2d | nn.Conv3d: ...


class ConvTransposeClass(Protocol):
    """``nn.ConvTranspose2d``/``nn.ConvTranspose3d`` as :func:`conv_transpose_type` hands it out (per-axis
    sizes as in :class:`ConvClass`)."""

    def __call__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = ...,
        bias: bool = ...,
    ) -> nn.ConvTranspose2d | nn.ConvTranspose3d: ...


def conv_type(dims: int) -> ConvClass:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    # cast: torch's stubs want exact pairs for Conv2d and triples for Conv3d; which one a tuple is
    # (its length is dims) is known only at run time
    return cast(ConvClass, {2: nn.Conv2d, 3: nn.Conv3d}[dims])


def conv_transpose_type(dims: int) -> ConvTransposeClass:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    # cast: as in conv_type
    return cast(ConvTransposeClass, {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims])


def dropout_type(dims: int) -> type[nn.Dropout2d] | type[nn.Dropout3d]:
    """Channel dropout, ``nn.Dropout2d`` or ``nn.Dropout3d``."""
    types: dict[int, type[nn.Dropout2d] | type[nn.Dropout3d]] = {2: nn.Dropout2d, 3: nn.Dropout3d}
    return types[dims]


def adaptive_avg_pool(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling of ``(B, C, *spatial)`` to ``size`` (2D or 3D).

    During ONNX export, a size that does not divide the input (ONNX has no adaptive pooling with
    overlapping cells) is pooled by :func:`_adaptive_avg_pool_matmul`, which computes the same averages.
    """
    size = tuple(int(s) for s in size)
    if torch.onnx.is_in_onnx_export() and any(int(n) % s for n, s in zip(x.shape[2:], size)):
        return _adaptive_avg_pool_matmul(x, size)
    # casts: size has one entry per spatial axis of x, which torch's stubs cannot tie to x.dim()
    if x.dim() == 5:
        return F.adaptive_avg_pool3d(x, cast(tuple[int, int, int], size))
    return F.adaptive_avg_pool2d(x, cast(tuple[int, int], size))


def _adaptive_avg_pool_matmul(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Adaptive average pooling as one ``(cells, n)`` averaging matrix per spatial axis (a cell's box mean is
    the product of per-axis means); cell ``i`` of ``k`` covers ``[floor(i n / k), ceil((i + 1) n / k))`` as
    in PyTorch."""
    for axis, k in enumerate(size):
        n = int(x.shape[axis + 2])
        weights = torch.zeros(k, n, dtype=x.dtype, device=x.device)
        for i in range(k):
            start, stop = (i * n) // k, -(-(i + 1) * n // k)
            weights[i, start:stop] = 1.0 / (stop - start)
        x = torch.matmul(x.transpose(axis + 2, -1), weights.t()).transpose(axis + 2, -1)
    return x


def upsample_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``(B, C, *spatial)`` to ``size`` by (bi/tri)linear interpolation; no-op when already there.

    A map of spatial size 1 is broadcast with ``expand`` (a view, no copy).
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if all(s == 1 for s in x.shape[2:]):
        return x.expand(*x.shape[:2], *size)
    mode = "trilinear" if x.dim() == 5 else "bilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def same_padding(kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """Padding that keeps the spatial size at stride 1 (kernels must be odd)."""
    for k in kernel:
        if k % 2 != 1:
            raise ValueError(f"kernel sizes must be odd to keep the spatial size, got {list(kernel)}")
    return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))


def _tuple(v: int | Sequence[int], dims: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * dims
    v = tuple(int(i) for i in v)
    if len(v) != dims:
        raise ValueError(f"expected {dims} entries, got {list(v)}")
    return v


def _clean_dilation(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    # dilation along an axis with kernel size 1 has no effect; keep it 1 so kernels pick the plain path
    return tuple(d if k > 1 else 1 for k, d in zip(kernel, dilation))


class ConvNormAct(nn.Sequential):
    """Convolution (no bias) -> normalisation -> optional dropout -> LeakyReLU(0.01).

    Keeps the spatial size at stride 1 ("same" padding) and divides it by ``stride`` otherwise (sizes
    divisible by the stride). With ``separable`` the convolution is depthwise (``groups=in_channels``)
    followed by a 1x1 pointwise convolution.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        dilation: int | Sequence[int] = 1,
        norm: str = NormLayer.INSTANCE,
        dropout: float = 0.0,
        separable: bool = False,
        act: bool = True,
    ) -> None:
        kernel = _tuple(kernel, dims)
        stride = _tuple(stride, dims)
        dilation = _clean_dilation(kernel, _tuple(dilation, dims))
        conv = conv_type(dims)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        pad = same_padding(kernel, dilation)
        if separable and all(k == 1 for k in kernel):
            separable = False
        if separable:
            layers["depthwise"] = conv(
                in_channels, in_channels, kernel, stride, pad, dilation, groups=in_channels, bias=False
            )
            layers["conv"] = conv(in_channels, out_channels, 1, bias=False)
        else:
            layers["conv"] = conv(in_channels, out_channels, kernel, stride, pad, dilation, bias=False)
        layers["norm"] = make_norm(norm, out_channels, dims)
        if dropout > 0:
            layers["dropout"] = dropout_type(dims)(dropout)
        if act:
            layers["act"] = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        super().__init__(layers)


class ResidualBlock(nn.Module):
    """Basic residual block (two convolutions, He et al. 2016), stride on the first convolution.

    ``y = act(norm(conv(act(norm(conv(x))))) + shortcut(x))`` where the shortcut is the identity, or a
    convolution with kernel = stride (1x1 when not strided) + norm when the shape changes.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        dilation: int | Sequence[int] = 1,
        norm: str = NormLayer.INSTANCE,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        stride = _tuple(stride, dims)
        self.conv1 = ConvNormAct(dims, in_channels, out_channels, kernel, stride, dilation, norm, dropout)
        self.conv2 = ConvNormAct(dims, out_channels, out_channels, kernel, 1, dilation, norm, act=False)
        if in_channels != out_channels or any(s != 1 for s in stride):
            # kernel = stride: every input voxel reaches the shortcut (a strided 1x1 convolution would drop
            # all but one voxel per cell, and its channels-last CPU backward crashes for few channels)
            self.shortcut: nn.Module = nn.Sequential(
                OrderedDict(
                    conv=conv_type(dims)(in_channels, out_channels, stride, stride, bias=False),
                    norm=make_norm(norm, out_channels, dims),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        # in place: the norm's backward needs its input, not its output
        y: torch.Tensor = self.act(out.add_(self.shortcut(x)))
        return y


def plain_stage(
    dims: int,
    in_channels: int,
    out_channels: int,
    kernel: Sequence[int],
    stride: Sequence[int],
    n_conv: int,
    norm: str,
    dropout: float = 0.0,
) -> nn.Sequential:
    """``n_conv`` :class:`ConvNormAct` layers, the first one strided."""
    layers = [ConvNormAct(dims, in_channels, out_channels, kernel, stride, norm=norm, dropout=dropout)]
    layers += [
        ConvNormAct(dims, out_channels, out_channels, kernel, norm=norm, dropout=dropout) for _ in range(n_conv - 1)
    ]
    return nn.Sequential(*layers)


def residual_stage(
    dims: int,
    in_channels: int,
    out_channels: int,
    kernel: Sequence[int],
    stride: Sequence[int],
    n_blocks: int,
    norm: str,
    dilation: Sequence[int] | int = 1,
    stem: bool = False,
    dropout: float = 0.0,
) -> nn.Sequential:
    """``n_blocks`` :class:`ResidualBlock` s, the first one strided; with ``stem`` a plain convolution
    ``in_channels -> out_channels`` comes first (for the input stage, whose input is the image)."""
    layers: list[nn.Module] = []
    if stem:
        layers.append(ConvNormAct(dims, in_channels, out_channels, kernel, stride, dilation, norm))
        in_channels, stride = out_channels, (1,) * dims
    for i in range(n_blocks):
        layers.append(
            ResidualBlock(
                dims,
                in_channels if i == 0 else out_channels,
                out_channels,
                kernel,
                stride if i == 0 else 1,
                dilation,
                norm,
                dropout,
            )
        )
    return nn.Sequential(*layers)


def blocks_per_stage(net: NetworkSpec) -> tuple[int, ...]:
    """Residual blocks per stage: ``options["blocks_per_stage"]`` (int or one per stage), else
    ``max(1, n_conv_per_stage // 2)`` (a basic block holds two convolutions)."""
    value = net.options.get("blocks_per_stage", max(1, net.n_conv_per_stage // 2))
    if isinstance(value, int):
        value = [value] * net.num_stages
    value = tuple(int(v) for v in value)
    if len(value) != net.num_stages or any(v < 1 for v in value):
        raise ValueError(f"options.blocks_per_stage must be an int >= 1 or {net.num_stages} of them, got {value}")
    return value


def init_weights(module: nn.Module) -> None:
    """He initialisation for LeakyReLU(0.01) on every (transposed) convolution; zero biases."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, a=LEAKY_SLOPE)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SegmentationNetwork(nn.Module):
    """Base class of medseg's architectures: input checking and the deep-supervision switch.

    Subclasses implement :meth:`_forward` returning a list of logits, full resolution first, and set
    ``size_divisor`` (per axis, what every input spatial size must be divisible by) and
    ``output_scales`` (per output of the list, its per-axis downsampling factor w.r.t. the input).

    ``forward`` returns the full-resolution logits ``(B, K, *spatial)``; in training mode with
    ``deep_supervision`` it returns the whole list ``[full, ...]`` (decreasing resolution).
    ``deep_supervision`` is a plain attribute and may be switched off after construction.

    Odd input sizes: an input whose spatial size is not divisible by ``size_divisor`` is rejected with a
    ``ValueError`` that names the padded shape to use; medseg's sliding-window predictor only ever feeds
    the planned patch size, which the plan guarantees to be divisible.
    """

    size_divisor: tuple[int, ...]
    output_scales: list[tuple[int, ...]]

    def __init__(self, net: NetworkSpec, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.dims = net.dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.deep_supervision = bool(net.deep_supervision)
        self.size_divisor = net.total_stride()
        self.output_scales = [(1,) * self.dims]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, *spatial)`` with divisible ``spatial``."""
        if x.dim() != self.dims + 2:
            layout = "(B, C, Z, Y, X)" if self.dims == 3 else "(B, C, Y, X)"
            raise ValueError(f"expected a {layout} input for this {self.dims}D network, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        spatial = tuple(x.shape[2:])
        if any(s % d for s, d in zip(spatial, self.size_divisor)):
            padded = [math.ceil(s / d) * d for s, d in zip(spatial, self.size_divisor)]
            raise ValueError(
                f"input spatial shape {list(spatial)} is not divisible by the network's total downsampling "
                f"{list(self.size_divisor)}; pad it to {padded} (e.g. with torch.nn.functional.pad) and crop "
                f"the output back"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input(x)
        with_aux = self.training and self.deep_supervision
        outs = self._forward(x, with_aux)
        return outs if with_aux else outs[0]

    def _forward(self, x: torch.Tensor, with_aux: bool) -> list[torch.Tensor]:
        raise NotImplementedError


def options_get(net: NetworkSpec, key: str, default: _T, kind: type[_T], choices: Sequence[_T] | None = None) -> _T:
    """Read ``net.options[key]`` checking its type (and value among ``choices``); ``ValueError`` otherwise."""
    value = net.options.get(key, default)
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok or (choices is not None and value not in choices):
        allowed = f" (one of {list(choices)})" if choices is not None else ""
        raise ValueError(f"options.{key} must be a {kind.__name__}{allowed}, got {value!r}")
    return cast(_T, value)  # an instance of kind: checked above (options hold builtins typed Any)


def options_positive_ints(
    net: NetworkSpec, key: str, default: Sequence[int], count: int | None = None
) -> tuple[int, ...]:
    """Read ``net.options[key]`` as positive integers (exactly ``count`` of them, else at least one).

    Raises:
        ValueError: a non-integer or non-positive entry, or the wrong number of entries.
    """
    values = tuple(net.options.get(key, default))
    wrong_count = len(values) != count if count is not None else not values
    if wrong_count or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        what = f"{count} positive integers" if count is not None else "a non-empty list of positive integers"
        raise ValueError(f"options.{key} must be {what}, got {list(values)}")
    return values


def check_known_options(net: NetworkSpec, known: Sequence[str]) -> None:
    """Refuse option keys the architecture does not know (typos must not pass silently)."""
    unknown = sorted(set(net.options) - set(known))
    if unknown:
        raise ValueError(f"unknown options {unknown} for architecture {net.arch!r}; known: {sorted(known)}")
