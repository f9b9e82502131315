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
from dataclasses import dataclass

import numpy as np
import torch

from medseg.faults import InjectedOutOfMemory
from medseg.inference.scratch import ScratchSpace
from medseg.inference.window_pass import PredictionStopped, WindowPass, activate
from medseg.machine import autocast_dtype
from medseg.progress import progress_bar

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
    scratch: ScratchSpace | None = None,
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
        scratch: keep the ``(K, Z, Y, X)`` accumulators on this disk-backed space (CPU accumulation only;
            :mod:`medseg.inference.scratch`) with at most its window of pages resident; the same results.

    Returns:
        softmax (or sigmoid) probabilities ``(K, Z, Y, X)`` on ``device`` (on the CPU after an out-of-memory
        fallback; on ``scratch`` when given), same spatial shape as ``data``: float32, or float16 when float32
        would exceed :data:`HALF_ACCUMULATOR_BYTES`.

    Out of GPU memory (``torch.OutOfMemoryError``) the prediction starts again with one input per batch,
    then with the accumulators on the CPU, then all on the CPU (:func:`fallback_steps`), and one warning
    says which way finished it.

    Raises:
        ValueError: ``data`` is not 4D, the patch does not have 2 or 3 entries, or a shift does not have
            one offset per patch axis.
        PredictionStopped: ``should_stop`` returned True.
        torch.OutOfMemoryError: the last fallback ran out of memory too.
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
    steps = fallback_steps(max(1, int(batch_size)), device)
    first_error: BaseException | None = None
    for i, fallback in enumerate(steps):
        try:
            result = _predict_once(
                model, data, patch, num_classes, step, mirror_axes, variants, fallback, precision,
                channels_last, progress, should_stop, activation, scratch,
            )  # fmt: skip
        except (torch.OutOfMemoryError, InjectedOutOfMemory) as exc:
            if i + 1 == len(steps):
                raise
            first_error = first_error or exc
            if fallback.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if first_error is not None:
            logger.warning(
                "out of memory in the sliding window (%s: %s); continued with %s",
                steps[0].describe(),
                str(first_error).splitlines()[0][:160] if str(first_error) else type(first_error).__name__,
                fallback.describe(),
            )
        return result
    raise AssertionError("unreachable: the last fallback step re-raises")


@dataclass(frozen=True)
class FallbackStep:
    """One way to run the sliding window: the batch size, where the network runs and where the
    accumulators live; ``name`` is the step's fault-injection name (:data:`FALLBACK_STEPS`)."""

    name: str
    batch_size: int
    device: torch.device
    accumulate_on: torch.device

    def describe(self) -> str:
        where = f"on {self.device.type}"
        if self.accumulate_on != self.device:
            where += f", accumulating on {self.accumulate_on.type}"
        return f"batch {self.batch_size} {where}"


#: The out-of-memory fallback steps, in order: as asked, one input per batch, accumulators on the CPU, all on
#: the CPU. Steps that change nothing on a device (a batch of 1 already, a CPU device) are left out.
FALLBACK_STEPS = ("as_asked", "batch_1", "cpu_accumulation", "cpu")


def fallback_steps(batch_size: int, device: torch.device | str) -> list[FallbackStep]:
    """The ways :func:`predict_sliding_window` tries, in order, when one runs out of memory.

    Args:
        batch_size: the batch size asked for.
        device: the device asked for.
    """
    device = torch.device(device)
    cpu = torch.device("cpu")
    candidates = [
        FallbackStep(FALLBACK_STEPS[0], batch_size, device, device),
        FallbackStep(FALLBACK_STEPS[1], 1, device, device),
        FallbackStep(FALLBACK_STEPS[2], 1, device, cpu),
        FallbackStep(FALLBACK_STEPS[3], 1, cpu, cpu),
    ]
    steps: list[FallbackStep] = []
    for c in candidates:
        if not any(
            (c.batch_size, c.device, c.accumulate_on) == (s.batch_size, s.device, s.accumulate_on) for s in steps
        ):
            steps.append(c)
    return steps


def _predict_once(
    model: torch.nn.Module,
    data: torch.Tensor,
    patch: tuple[int, ...],
    num_classes: int,
    step: float,
    mirror_axes: Sequence[int] | None,
    variants: list[tuple[int, ...]],
    fallback: FallbackStep,
    precision: str,
    channels_last: bool,
    progress: bool,
    should_stop: Callable[[], bool] | None,
    activation: str,
    scratch: ScratchSpace | None,
) -> torch.Tensor:
    """:func:`predict_sliding_window` in one way (``fallback``); the arguments are checked there."""
    device, acc_device = fallback.device, fallback.accumulate_on
    moved = device.type == "cpu" and next(model.parameters(), torch.empty(0)).device.type != "cpu"
    home = next(model.parameters(), torch.empty(0)).device
    if moved:  # the last fallback: the network on the CPU for this call
        model.to(device)
    try:
        is_2d = len(patch) == 2
        tile = (1, *patch) if is_2d else patch  # tile shape in the (Z, Y, X) volume
        spatial = tuple(int(s) for s in data.shape[1:])
        x = data.to(device=device, dtype=torch.float32)
        big = num_classes * int(np.prod(spatial)) * 4 > HALF_ACCUMULATOR_BYTES
        acc_dtype = torch.float16 if big else torch.float32
        if scratch is not None and acc_device.type == "cpu":
            logits = scratch.zeros((num_classes, *spatial), acc_dtype)
        else:
            scratch = None
            logits = torch.zeros((num_classes, *spatial), dtype=acc_dtype, device=acc_device)
        weights = torch.zeros(spatial, dtype=torch.float32, device=acc_device)
        ctx = WindowPass(
            model, patch, tile, num_classes, step, mirror_combinations(mirror_axes), device,
            autocast_dtype(precision, device.type), channels_last, fallback.batch_size, should_stop,
            accumulate_on=acc_device, scratch=scratch, step_name=fallback.name,
        )  # fmt: skip
        bar = None
        if progress:
            total = sum(ctx.num_positions(shifted_shape(spatial, v)) for v in variants)
            bar = progress_bar(total=total, desc="patches", unit="patch", leave=False)
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=ctx.amp_dtype or torch.bfloat16, enabled=ctx.amp_dtype is not None),
        ):
            for offset in variants:
                vol_offset = (0, *offset) if is_2d else offset
                # the volume moves by o against the patch grid: 2|o| zeros are padded before it (o > 0) or
                # after it (o < 0), and the padded volume is centred in the tile where smaller; no voxel is
                # lost, but a volume that grows past a multiple of the step gets one more patch along that axis
                before = [2 * o if o > 0 else 0 for o in vol_offset]
                after = [-2 * o if o < 0 else 0 for o in vol_offset]
                ctx.accumulate(x, before, after, logits, weights, bar)
        if bar is not None:
            bar.close()
        return activate(logits, weights, activation, scratch)
    finally:
        if moved:
            model.to(home)


__all__ = [
    "FALLBACK_STEPS",
    "HALF_ACCUMULATOR_BYTES",
    "MAX_SHIFT_VARIANTS",
    "FallbackStep",
    "PredictionStopped",
    "fallback_steps",
    "mirror_combinations",
    "predict_sliding_window",
    "shift_variants",
    "shifted_shape",
    "tta_variants",
]
