"""Facts about the machine medseg runs on, shared by planning, training and inference."""

from __future__ import annotations

import torch


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX through oneDNN).

    Without it, bf16 autocast is emulated and many times slower than float32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


__all__ = ["cpu_has_fast_bf16"]
