"""Sliding-window inference with Gaussian importance weighting and mirror test-time augmentation.

The volume is covered by overlapping patches (``step`` = 0.5 -> neighbouring patches overlap by half a
patch). Each patch's *logits* are weighted with a Gaussian importance map (centre voxels count more than
border voxels, whose receptive field is truncated) and accumulated into one ``(K, Z, Y, X)`` float32
buffer on the compute device, together with the sum of the weights. After the last patch the weighted
mean of the logits is turned into softmax probabilities in place (a region plan's network, with one
sigmoid output per region: ``activation="sigmoid"``, each channel's sigmoid). Where the patches go and the
Gaussian map are :mod:`medseg.inference.tiling`.

Mirror test-time augmentation (TTA) runs the network on every combination of flips over ``mirror_axes``
(``2**n`` passes, the unflipped one included), flips each output back and averages the *logits* before
the Gaussian weighting. Averaging logits (rather than probabilities) keeps a single accumulation buffer
and matches what the network's loss was computed on; the two differ only marginally in practice.

Shift TTA predicts the volume again with the patch grid moved by a few voxels (``shifts``): a network
that pools by 8 sees a voxel at one of 8 positions against its pooling grid per axis, and its output
depends a little on which, so averaging over positions half a stride apart is a small ensemble at no
training cost. When a plan mirrors fewer axes than nnU-Net does (:mod:`medseg.planning.mirroring`), the
passes its mirroring of every axis would cost go to shifts instead (:func:`tta_variants`). Measured on
hippocampus fold 0 (README, "Shift TTA"), 2 flips x 2 shifts beat the 2 flips alone on every model tried.

2D configurations (a patch with two entries) are predicted slice by slice along Z: the volume is cut
into ``(1, py, px)`` tiles, fed to the network as ``(B, C, py, px)`` batches (several slices per batch).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medseg.inference.tiling import gaussian_importance_map, tile_starts
from medseg.machine import autocast_dtype

logger = logging.getLogger(__name__)

#: Shift variants TTA uses at most. On hippocampus fold 0, 2 opposite corners gained as much as 4 or 8
#: (README, "Shift TTA"), so more only cost time.
MAX_SHIFT_VARIANTS = 2

#: Above this many bytes a float32 ``(K, Z, Y, X)`` accumulator is kept in float16 instead (as nnU-Net
#: does always): many classes on a large scan (45 classes x 191x171x155 voxels: 0.93 GB in float32).
#: Logit sums stay far inside float16's range; its 11-bit mantissa leaves argmax ties at ~1e-3.
HALF_ACCUMULATOR_BYTES = 512 * 2**20


def mirror_combinations(axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """All subsets of ``axes`` (the empty one first): the flips mirror TTA runs."""
    axes = tuple(axes or ())
    combos: list[tuple[int, ...]] = []
    for r in range(len(axes) + 1):
        combos.extend(itertools.combinations(axes, r))
    return combos


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (list, tuple)):  # deep supervision outputs: full resolution first
        out = out[0]
    return out


def shift_variants(total_stride: Sequence[int], num_variants: int) -> list[tuple[int, ...]]:
    """Offsets of the volume against the patch grid for shift TTA (see the module docstring).

    Along each patch axis whose network stride is at least 4 the volume is moved by ``s = stride // 4``
    voxels either way, so two variants differ by half a stride: the most a voxel's position against the
    network's pooling grid can change. The variants are the corners of that box: all ``2**n`` of them
    when ``num_variants`` allows, else the even-parity half (a tetrahedron in 3D), else the two opposite
    corners; fewer than two means no shifting.

    Args:
        total_stride: the network's downsampling factor per patch axis.
        num_variants: the most variants wanted.

    Returns:
        Per variant, one offset per patch axis; ``[(0, ..., 0)]`` when nothing is shifted.
    """
    steps = [int(st) // 4 for st in total_stride]
    axes = [i for i, v in enumerate(steps) if v > 0]
    zero = tuple(0 for _ in steps)
    if num_variants < 2 or not axes:
        return [zero]
    corners = list(itertools.product((-1, 1), repeat=len(axes)))
    if num_variants < len(corners):
        even = [c for c in corners if c.count(1) % 2 == 0]
        corners = even if num_variants >= len(even) and len(even) > 2 else [corners[0], corners[-1]]
    variants = []
    for c in corners:
        off = list(zero)
        for a, sign in zip(axes, c):
            off[a] = sign * steps[a]
        variants.append(tuple(off))
    return variants


def shifted_shape(shape: Sequence[int], offset: Sequence[int]) -> tuple[int, ...]:
    """Shape of a volume moved by ``offset`` against the patch grid: each of the last ``len(offset)``
    axes grows by ``2 * |o|`` (the zeros padded before it for ``o > 0``, after it for ``o < 0``)."""
    lead = len(shape) - len(offset)
    return tuple(int(n) + (2 * abs(int(offset[i - lead])) if i >= lead else 0) for i, n in enumerate(shape))


def tta_variants(
    mirror_axes: Sequence[int] | None, total_stride: Sequence[int], passes: int | None = None
) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The test-time augmentation of a network: ``(mirror axes, shift variants)``.

    TTA spends the passes nnU-Net's mirroring of every axis would (``2**dims``: 8 in 3D, 4 in 2D) unless
    ``passes`` says otherwise: first on the flips the plan allows (``2**len(mirror_axes)``), the rest on
    shift variants (:func:`shift_variants`). A plan mirroring every axis therefore gets no shifts; one that
    mirrors only X in 3D gets 2 flips x 2 shifts (at most :data:`MAX_SHIFT_VARIANTS` shifts). Fewer
    ``passes`` than the flips (a time budget shortening the final validation) mirror only the last
    ``floor(log2(passes))`` of ``mirror_axes`` (X before Y before Z), without shifts; 1 pass is no TTA.

    Args:
        mirror_axes: the patch axes the network was trained mirrored.
        total_stride: its downsampling factor per patch axis.
        passes: network passes per patch position to spend at most (None = ``2**dims``).
    """
    axes = tuple(int(a) for a in (mirror_axes or ()))
    budget = 2 ** len(total_stride) if passes is None else max(1, int(passes))
    if 2 ** len(axes) > budget:
        keep = budget.bit_length() - 1  # floor(log2(budget))
        axes = axes[len(axes) - keep :] if keep else ()
    return axes, shift_variants(total_stride, min(MAX_SHIFT_VARIANTS, budget // 2 ** len(axes)))


class PredictionStopped(RuntimeError):
    """Raised by :func:`predict_sliding_window` when its ``should_stop`` callback asks it to stop."""


def predict_sliding_window(
    model: torch.nn.Module,
    data: torch.Tensor,
    patch_size: Sequence[int],
    num_classes: int,
    *,
    step: float = 0.5,
    mirror_axes: Sequence[int] | None = None,
    shifts: Sequence[Sequence[int]] | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    batch_size: int = 1,
    channels_last: bool = False,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
    activation: str = "softmax",
) -> torch.Tensor:
    """Predict a whole preprocessed volume patch by patch.

    Args:
        model: network in eval mode; ``forward((B, C, *patch)) -> logits (B, K, *patch)``.
        data: preprocessed image, float ``(C, Z, Y, X)`` (on any device).
        patch_size: ``(pz, py, px)`` for a 3D network or ``(py, px)`` for a 2D network (then every Z
            slice is predicted on its own).
        num_classes: ``K``, number of output channels of the network.
        step: distance between neighbouring patches as a fraction of the patch size (0.5 = half overlap).
        mirror_axes: spatial axes of the *patch* to mirror for TTA (e.g. ``(0, 1, 2)`` for 3D,
            ``(0, 1)`` for 2D); None or empty disables TTA.
        shifts: shift TTA: per variant, one offset in voxels per patch axis (see :func:`shift_variants`);
            the volume is predicted once per variant, moved by that offset against the patch grid.
            None = one unshifted pass.
        device: where the network runs and the ``(K, Z, Y, X)`` accumulators live.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast (see :func:`autocast_dtype`).
        batch_size: network inputs per forward pass; with TTA the flips of a patch count as separate
            inputs, so a batch may hold several flips of one patch.
        channels_last: feed channels-last inputs (use with a model converted to channels-last).
        progress: show a tqdm bar over the patches.
        should_stop: called before every network batch; True abandons the prediction (a time budget's
            deadline) with :class:`PredictionStopped`.
        activation: ``"softmax"`` over the channels (classes), or ``"sigmoid"`` per channel (region plans,
            :mod:`medseg.preprocessing.regions`); applied to the weighted mean of the logits.

    Returns:
        softmax (or sigmoid) probabilities ``(K, Z, Y, X)`` on ``device``, same spatial shape as ``data``: float32, or
        float16 when float32 would exceed :data:`HALF_ACCUMULATOR_BYTES`.

    Raises:
        ValueError: ``data`` is not 4D, the patch does not have 2 or 3 entries, or a shift does not have
            one offset per patch axis.
        PredictionStopped: ``should_stop`` returned True.
    """
    device = torch.device(device)
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    if data.ndim != 4:
        raise ValueError(f"data must be (C, Z, Y, X), got shape {tuple(data.shape)}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) not in (2, 3):
        raise ValueError(f"patch_size must have 2 or 3 entries, got {patch}")
    variants = [tuple(int(v) for v in sh) for sh in shifts] if shifts else [tuple(0 for _ in patch)]
    bad = [list(v) for v in variants if len(v) != len(patch)]
    if bad:
        raise ValueError(f"each shift needs one offset per patch axis ({len(patch)}), got {bad}")
    is_2d = len(patch) == 2
    tile = (1, *patch) if is_2d else patch  # tile shape in the (Z, Y, X) volume
    spatial = tuple(int(s) for s in data.shape[1:])
    x = data.to(device=device, dtype=torch.float32)
    acc_dtype = torch.float16 if num_classes * int(np.prod(spatial)) * 4 > HALF_ACCUMULATOR_BYTES else torch.float32
    logits = torch.zeros((num_classes, *spatial), dtype=acc_dtype, device=device)
    weights = torch.zeros(spatial, dtype=torch.float32, device=device)
    ctx = _WindowContext(
        model,
        patch,
        tile,
        num_classes,
        step,
        mirror_combinations(mirror_axes),
        device,
        autocast_dtype(precision, device.type),
        channels_last,
        max(1, int(batch_size)),
        should_stop,
    )
    bar = None
    if progress:
        total = sum(ctx.num_positions(shifted_shape(spatial, v)) for v in variants)
        bar = tqdm(total=total, desc="patches", unit="patch", leave=False)
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=ctx.amp_dtype or torch.bfloat16, enabled=ctx.amp_dtype is not None),
    ):
        for offset in variants:
            vol_offset = (0, *offset) if is_2d else offset
            # the volume moves by o against the patch grid: 2|o| zeros are padded before it (o > 0) or after
            # it (o < 0), and the padded volume is centred in the tile where smaller; no voxel is lost, but a
            # volume that grows past a multiple of the step gets one more patch along that axis
            before = [2 * o if o > 0 else 0 for o in vol_offset]
            after = [-2 * o if o < 0 else 0 for o in vol_offset]
            ctx.accumulate(x, before, after, logits, weights, bar)
    if bar is not None:
        bar.close()
    if activation == "sigmoid":
        for k0 in range(0, num_classes, 4):  # float32 a few channels at a time (a float16 buffer stays float16)
            logits[k0 : k0 + 4] = logits[k0 : k0 + 4].float().div_(weights).sigmoid_()
        return logits.contiguous()
    if logits.dtype != torch.float32:
        _softmax_in_chunks(logits, weights)
        return logits.contiguous()
    # weighted mean of logits -> softmax, in place on the single (K, Z, Y, X) buffer
    logits /= weights
    logits -= logits.amax(dim=0, keepdim=True)
    logits.exp_()
    logits /= logits.sum(dim=0, keepdim=True)
    return logits.contiguous()


def _softmax_in_chunks(logits: torch.Tensor, weights: torch.Tensor, chunk: int = 4) -> None:
    """Softmax over classes of ``logits / weights`` in place on a float16 buffer, computed in float32 a few
    classes at a time (mixed-dtype in-place ops on the whole buffer would allocate float32 copies of it)."""
    k = logits.shape[0]
    peak: torch.Tensor | None = None
    for k0 in range(0, k, chunk):
        m = logits[k0 : k0 + chunk].float().div_(weights).amax(dim=0)
        peak = m if peak is None else torch.maximum(peak, m, out=peak)
    assert peak is not None, "no classes"
    total = torch.zeros_like(weights)
    for k0 in range(0, k, chunk):
        c = logits[k0 : k0 + chunk].float().div_(weights).sub_(peak).exp_()
        total += c.sum(dim=0)
        logits[k0 : k0 + chunk] = c
    for k0 in range(0, k, chunk):
        logits[k0 : k0 + chunk] = logits[k0 : k0 + chunk].float().div_(total)


class _WindowContext:
    """The network and settings of one :func:`predict_sliding_window` call; runs one shift variant."""

    def __init__(
        self,
        model: torch.nn.Module,
        patch: tuple[int, ...],
        tile: tuple[int, ...],
        num_classes: int,
        step: float,
        flips: list[tuple[int, ...]],
        device: torch.device,
        amp_dtype: torch.dtype | None,
        channels_last: bool,
        batch_size: int,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.model, self.patch, self.tile, self.num_classes, self.step = model, patch, tile, num_classes, step
        self.flips, self.device, self.amp_dtype, self.batch_size = flips, device, amp_dtype, batch_size
        self.should_stop = should_stop
        self.is_2d = len(patch) == 2
        self.memory_format = None
        if channels_last:
            self.memory_format = torch.channels_last if self.is_2d else torch.channels_last_3d
        weight_patch = gaussian_importance_map(patch, device=device)
        self.weight_patch = weight_patch[None] if self.is_2d else weight_patch

    def num_positions(self, spatial: Sequence[int]) -> int:
        return int(np.prod([len(tile_starts(max(s, t), t, self.step)) for s, t in zip(spatial, self.tile)]))

    def accumulate(
        self,
        data: torch.Tensor,
        before: Sequence[int],
        after: Sequence[int],
        logits: torch.Tensor,
        weights: torch.Tensor,
        bar: tqdm | None,
    ) -> None:
        """Add the Gaussian-weighted logits (and weights) of every patch of ``data`` padded by
        ``before``/``after`` (then centred in the tile where smaller) into ``logits``/``weights``."""
        tile, flips = self.tile, self.flips
        spatial = tuple(int(s) for s in data.shape[1:])
        shifted = [s + b + a for s, b, a in zip(spatial, before, after)]
        # pad (centred) where the volume is smaller than the tile, crop back at the end
        pad_before = [b + max(0, (t - s) // 2) for s, t, b in zip(shifted, tile, before)]
        pad_after = [a + max(0, t - s) - max(0, (t - s) // 2) for s, t, a in zip(shifted, tile, after)]
        x = data
        if any(pad_before) or any(pad_after):
            pads: list[int] = []
            for b, a in zip(reversed(pad_before), reversed(pad_after)):
                pads += [b, a]
            x = F.pad(x, pads, mode="constant", value=0.0)
        padded = tuple(int(s) for s in x.shape[1:])
        crop = tuple(slice(b, b + s) for b, s in zip(pad_before, spatial))
        own = any(pad_before) or any(pad_after)
        acc_logits = torch.zeros((self.num_classes, *padded), dtype=logits.dtype, device=self.device) if own else logits
        acc_weights = torch.zeros(padded, dtype=torch.float32, device=self.device) if own else weights

        positions = list(itertools.product(*[tile_starts(s, t, self.step) for s, t in zip(padded, tile)]))
        # mirror TTA: every (tile, flip) pair is one network input; batches mix tiles and flips, and a
        # tile's logits go into the volume buffer once all its flips are in. Flip axes index the patch.
        tile_slices = [tuple(slice(p, p + t) for p, t in zip(pos, tile)) for pos in positions]
        items = [(ti, fi) for ti in range(len(positions)) for fi in range(len(flips))]
        partial: dict[int, torch.Tensor] = {}
        seen: dict[int, int] = {}
        bs = self.batch_size
        for b0 in range(0, len(items), bs):
            if self.should_stop is not None and self.should_stop():
                raise PredictionStopped("prediction stopped: the time budget's deadline was reached")
            chunk = items[b0 : b0 + bs]
            inputs = []
            for ti, fi in chunk:
                t = x[(slice(None), *tile_slices[ti])]
                if self.is_2d:
                    t = t[:, 0]
                dims = [1 + a for a in flips[fi]]  # item layout (C, *patch)
                inputs.append(torch.flip(t, dims) if dims else t)
            batch = torch.stack(inputs)
            if self.memory_format is not None:
                batch = batch.contiguous(memory_format=self.memory_format)
            out = _forward(self.model, batch).float()
            if out.shape[0] != len(chunk) or out.shape[1] != self.num_classes or tuple(out.shape[2:]) != self.patch:
                raise ValueError(
                    f"network returned shape {tuple(out.shape)}, expected ({len(chunk)}, {self.num_classes}, "
                    f"{', '.join(map(str, self.patch))})"
                )
            for j, (ti, fi) in enumerate(chunk):
                dims = [1 + a for a in flips[fi]]
                o = torch.flip(out[j], dims) if dims else out[j]
                if ti in partial:
                    partial[ti].add_(o)
                else:
                    partial[ti] = o.clone() if len(flips) > 1 else o
                seen[ti] = seen.get(ti, 0) + 1
                if seen[ti] < len(flips):
                    continue
                acc = partial.pop(ti)
                if len(flips) > 1:
                    acc /= len(flips)
                if self.is_2d:
                    acc = acc[:, None]
                # weight in place, then add (cast to the accumulator's dtype: float16 for large outputs)
                acc.mul_(self.weight_patch)
                acc_logits[(slice(None), *tile_slices[ti])] += acc.to(acc_logits.dtype)
                acc_weights[tile_slices[ti]] += self.weight_patch
                if bar is not None:
                    bar.update(1)
        if own:
            logits += acc_logits[(slice(None), *crop)]
            weights += acc_weights[crop]
