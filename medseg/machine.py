"""Facts about the machine medseg runs on, shared by planning, training and inference."""

from __future__ import annotations

import torch

from medseg.options import DeviceKind, Precision


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX through oneDNN).

    Without it, bf16 autocast is emulated and many times slower than float32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def autocast_dtype(precision: str, device_type: str | None = None) -> torch.dtype | None:
    """The autocast dtype of a precision (None = run in float32); the one mapping of training and prediction.

    ``fp32`` -> None, ``bf16`` -> bfloat16, ``fp16`` -> float16, except on a CPU (``device_type == "cpu"``),
    where ``fp16`` means bfloat16: CPU float16 kernels are slow, and prediction with a run trained at fp16
    on a GPU still gets a reduced precision there. Training passes no device: it refuses fp16 on a CPU before
    (:func:`medseg.training.device.resolve_precision`) and takes the name literally.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16`` (a :class:`~medseg.options.Precision` or its string).
        device_type: ``"cpu"``, ``"cuda"`` ... (``torch.device.type``) where the autocast runs; None = the
            dtype the name says.

    Raises:
        ValueError: any other precision (``auto`` must be resolved first).
    """
    if precision == Precision.FP32:
        return None
    if precision == Precision.BF16:
        return torch.bfloat16
    if precision == Precision.FP16:
        return torch.bfloat16 if device_type == DeviceKind.CPU else torch.float16
    raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")


__all__ = ["autocast_dtype", "cpu_has_fast_bf16"]
