"""Running one ensemble member's network: compiled or eager, channels-last, batch size and precision.

The choices :class:`~medseg.inference.predictor.Predictor` makes for each member before it hands the network
to the sliding window (:func:`~medseg.inference.sliding_window.predict_sliding_window`): once, when it is
built (:func:`prepare_network`), and per call (:func:`inference_batch_size`, :func:`auto_precision`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medseg.machine import cpu_has_fast_bf16

logger = logging.getLogger(__name__)

#: Architectures whose CPU inference measured faster channels-last (unet 3D at the hippocampus plan: ~12 %
#: less CPU time; deeplab 2D/3D 5-12 %); psp and fcn measured slower (scripts/bench_predict.py --variants).
CHANNELS_LAST_ARCHS = frozenset({"unet", "deeplab"})


class CompiledOrEager(torch.nn.Module):
    """``torch.compile``'d forward that falls back to the eager module (with a warning) if compiling fails,
    e.g. on a machine without a C++ compiler."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.compiled: Any = torch.compile(model, dynamic=False)
        self.failed = False

    def forward(self, x: torch.Tensor) -> Any:
        if not self.failed:
            try:
                return self.compiled(x)
            except Exception as exc:  # noqa: BLE001 - any compiler problem: run eagerly instead
                self.failed = True
                logger.warning(
                    "torch.compile failed (%s: %s); running the network eagerly",
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                )
        return self.model(x)


def prepare_network(
    model: torch.nn.Module,
    arch: str,
    dims: int,
    device: torch.device,
    channels_last: bool | None = None,
    compile: bool = False,
) -> tuple[torch.nn.Module, bool]:
    """Ready one member's network for the sliding window: eval mode on ``device``, channels-last where chosen,
    compiled if asked.

    Args:
        model: the member's network; converted in place (eval mode, moved, channels-last memory format).
        arch: its architecture name (channels-last by default on the CPU for :data:`CHANNELS_LAST_ARCHS`).
        dims: 2 or 3, the dimensions of its patch.
        device: where it runs.
        channels_last: run its convolutions channels-last; None = on the CPU for :data:`CHANNELS_LAST_ARCHS`.
        compile: wrap it in :class:`CompiledOrEager`.

    Returns:
        ``(the module to call, whether its inputs are to be fed channels-last)``.
    """
    model.eval()
    model.to(device)
    cl = channels_last if channels_last is not None else (device.type == "cpu" and arch in CHANNELS_LAST_ARCHS)
    if cl:
        # Module.to takes memory_format at run time; torch's overloads of Module.to leave it out
        model.to(
            memory_format=torch.channels_last
            if dims == 2  # type: ignore[call-overload]
            else torch.channels_last_3d
        )
    return (CompiledOrEager(model) if compile else model), cl


#: Forward-pass memory one CPU inference batch may take (activations + logits, see inference_batch_size).
CPU_INFERENCE_BATCH_BYTES = 2**30


def inference_batch_size(patch_size: Sequence[int], base_features: int, num_classes: int, device: torch.device) -> int:
    """Patches per forward pass: on a GPU 2 (3D) / 8 (2D); on a CPU as many of 4 (3D) / 8 (2D) as fit
    :data:`CPU_INFERENCE_BATCH_BYTES`, at least 1.

    A forward pass holds about ``patch voxels x 4 B x (classes + 6 x base features)`` per patch (measured:
    1.22 GB for a 32-feature 128x112x96 UNet with 46 classes, fp32). Larger batches are faster on a CPU
    (16f 64x48x96: 15.3 s at 4, 20.0 s at 2, 30.4 s at 1 per volume), until they cost memory that a
    many-class scan needs for its probabilities.
    """
    dims = len(patch_size)
    cap = 8 if dims == 2 else (2 if device.type == "cuda" else 4)
    if device.type != "cpu":
        return cap
    per_patch = float(np.prod(patch_size)) * 4.0 * (num_classes + 6 * base_features)
    return max(1, min(cap, int(CPU_INFERENCE_BATCH_BYTES // per_patch)))


def auto_precision(planned: str, device: torch.device) -> str:
    """The plan's precision, except reduced precision on a CPU without native bf16 (emulated: far slower)."""
    if device.type == "cpu" and planned != "fp32" and not cpu_has_fast_bf16():
        return "fp32"
    return planned
