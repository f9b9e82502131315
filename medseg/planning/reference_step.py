"""The reference training step the planner times and whose memory it estimates.

:func:`training_step` runs forward under autocast at the planned precision, :func:`reference_loss` (soft
Dice + cross-entropy summed over the deep-supervision outputs, targets subsampled to each output's
resolution), backward and an SGD step with Nesterov momentum (:func:`make_optimizer`). A trainer with a
different but similar loss needs about the same time and memory (the loss works on ``K``-channel tensors,
small next to the network's activations).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.machine import autocast_dtype
from medseg.options import Precision, parse_option


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The reference optimizer: SGD, Nesterov momentum 0.99, weight decay 3e-5 (one buffer per parameter)."""
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5, foreach=False)


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    x: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    precision: str = Precision.FP32,
) -> torch.Tensor:
    """One reference training step: forward (autocast at ``precision``), loss, backward, SGD step.

    Args:
        optimizer: the optimizer to step and zero (``set_to_none``); None stops after backward.
        x: input ``(B, C, *spatial)`` float32.
        target: class indices ``(B, *spatial)`` int64.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast as the trainer's: fp16 is float16).

    Returns:
        The detached loss.

    Raises:
        ConfigError: ``precision`` is not a precision.
    """
    dtype = autocast_dtype(parse_option(Precision, precision, "precision"))
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(x)
    loss = reference_loss(out if isinstance(out, list) else [out], target, num_classes)
    loss.backward()  # type: ignore[no-untyped-call]  # Tensor.backward is unannotated in torch
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def reference_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Soft Dice (foreground classes) + cross-entropy, over deep-supervision outputs with halving weights.

    Args:
        outputs: logits ``(B, K, *spatial_i)``, full resolution first.
        target: class indices ``(B, *spatial)`` int64, subsampled (nearest) to each output's size.

    Returns:
        Scalar loss (float32).
    """
    total = target.new_zeros((), dtype=torch.float32)
    weights = [0.5**i for i in range(len(outputs))]
    norm = sum(weights)
    for w, logits in zip(weights, outputs):
        logits = logits.float()
        steps = [t // o for t, o in zip(target.shape[1:], logits.shape[2:])]
        t = target[(slice(None), *(slice(None, None, s) for s in steps))]
        ce = F.cross_entropy(logits, t)
        probs = logits.softmax(1)
        onehot = torch.zeros_like(probs).scatter_(1, t.unsqueeze(1), 1.0)
        axes = tuple(range(2, probs.dim()))
        inter = (probs * onehot).sum(axes)
        denom = probs.sum(axes) + onehot.sum(axes)
        dice = (2 * inter + 1e-5) / (denom + 1e-5)
        fg = dice[:, 1:] if num_classes > 1 else dice
        total = total + (w / norm) * (ce + 1 - fg.mean())
    return total
