"""One pass of the sliding window over a volume, and the activation of its accumulated logits.

:class:`WindowPass` runs the network over every patch position of one shift variant of a volume (mirror TTA
flips batched together) and adds the Gaussian-weighted logits into the ``(K, Z, Y, X)`` accumulator;
:func:`activate` turns the weighted logit sums into softmax (or sigmoid) probabilities in place.
:func:`medseg.inference.sliding_window.predict_sliding_window` drives both; the module docstring there
explains the method.

Accumulators may live on another device than the network (a GPU out-of-memory fallback keeps them on the
CPU) or on a disk-backed scratch space (:mod:`medseg.inference.scratch`, a streamed case of
:mod:`medseg.inference.memory_plan`): then every accumulation reports the pages it touched, and the
activation runs slab by slab along Z, with the same per-voxel arithmetic as on the whole buffer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medseg.faults import is_armed, maybe_fail
from medseg.inference.scratch import ScratchSpace, z_slabs
from medseg.inference.tiling import gaussian_importance_map, tile_starts

#: Fault-injection point hit before every network batch when armed (:mod:`medseg.faults`), named after the
#: out-of-memory fallback step running (:data:`medseg.inference.sliding_window.FALLBACK_STEPS`).
FAULT_POINT = "window_batch"


class PredictionStopped(RuntimeError):
    """Raised by :func:`~medseg.inference.sliding_window.predict_sliding_window` when its ``should_stop``
    callback asks it to stop."""


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (list, tuple)):  # deep supervision outputs: full resolution first
        out = out[0]
    return out


def activate(
    logits: torch.Tensor, weights: torch.Tensor, activation: str, scratch: ScratchSpace | None = None
) -> torch.Tensor:
    """Weighted mean of the logits -> softmax over classes (or sigmoid per channel), in place.

    Args:
        logits: ``(K, Z, Y, X)`` sums of Gaussian-weighted logits, float32 or float16.
        weights: ``(Z, Y, X)`` float32 sums of the weights.
        activation: ``"softmax"`` or ``"sigmoid"``.
        scratch: the scratch space ``logits`` lives on, if any (the pages touched are reported to it).

    Runs Z slab by Z slab (:func:`~medseg.inference.scratch.z_slabs`) in any case, so that a streamed case
    and one in memory get bit-identical probabilities.

    Returns:
        ``logits``, now probabilities (contiguous).
    """
    for z in z_slabs(logits):
        _activate(logits[:, z], weights[z], activation)
        if scratch is not None:
            scratch.touched(logits[:, z].numel() * logits.element_size())
    if scratch is not None:
        scratch.release()
    return logits.contiguous()


def _activate(logits: torch.Tensor, weights: torch.Tensor, activation: str) -> None:
    num_classes = logits.shape[0]
    if activation == "sigmoid":
        for k0 in range(0, num_classes, 4):  # float32 a few channels at a time (a float16 buffer stays float16)
            logits[k0 : k0 + 4] = logits[k0 : k0 + 4].float().div_(weights).sigmoid_()
        return
    if logits.dtype != torch.float32:
        _softmax_in_chunks(logits, weights)
        return
    # weighted mean of logits -> softmax, in place on the single (K, Z, Y, X) buffer
    logits /= weights
    logits -= logits.amax(dim=0, keepdim=True)
    logits.exp_()
    logits /= logits.sum(dim=0, keepdim=True)


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


class WindowPass:
    """The network and settings of one :func:`~medseg.inference.sliding_window.predict_sliding_window` call;
    runs one shift variant.

    ``device`` runs the network; ``accumulate_on`` holds the accumulators (None = ``device``); ``scratch``
    allocates padded accumulators and is told the pages each patch touches; ``step_name`` names the
    out-of-memory fallback step for fault injection.
    """

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
        accumulate_on: torch.device | None = None,
        scratch: ScratchSpace | None = None,
        step_name: str = "",
    ) -> None:
        self.model, self.patch, self.tile, self.num_classes, self.step = model, patch, tile, num_classes, step
        self.flips, self.device, self.amp_dtype, self.batch_size = flips, device, amp_dtype, batch_size
        self.should_stop = should_stop
        self.accumulate_on = accumulate_on or device
        self.scratch, self.step_name, self.inject = scratch, step_name, is_armed(FAULT_POINT)
        self.is_2d = len(patch) == 2
        self.memory_format = None
        if channels_last:
            self.memory_format = torch.channels_last if self.is_2d else torch.channels_last_3d
        weight_patch = gaussian_importance_map(patch, device=device)
        self.weight_patch = weight_patch[None] if self.is_2d else weight_patch
        self.acc_weight_patch = self.weight_patch.to(self.accumulate_on)

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
        acc_logits, acc_weights = logits, weights
        if own:
            shape = (self.num_classes, *padded)
            if self.scratch is not None:
                acc_logits = self.scratch.zeros(shape, logits.dtype)
            else:
                acc_logits = torch.zeros(shape, dtype=logits.dtype, device=self.accumulate_on)
            acc_weights = torch.zeros(padded, dtype=torch.float32, device=self.accumulate_on)
        # pages of the accumulator one patch touches: its rows, whole (a page holds whole rows of short ones)
        touch = self.num_classes * int(np.prod(tile[:-1])) * padded[-1] * acc_logits.element_size()

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
            if self.inject:
                maybe_fail(FAULT_POINT, self.step_name)
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
                acc_logits[(slice(None), *tile_slices[ti])] += acc.to(self.accumulate_on, acc_logits.dtype)
                acc_weights[tile_slices[ti]] += self.acc_weight_patch
                if self.scratch is not None:
                    self.scratch.touched(touch)
                if bar is not None:
                    bar.update(1)
        if own:
            for z in z_slabs(logits):  # slab by slab, as in_slabs: the same sums in memory and streamed
                source = (slice(None), slice(crop[0].start + z.start, crop[0].start + z.stop), *crop[1:])
                logits[:, z] += acc_logits[source]
                if self.scratch is not None:
                    self.scratch.touched(2 * logits[:, z].numel() * logits.element_size())
            weights += acc_weights[crop]
