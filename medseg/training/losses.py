"""Segmentation losses: soft Dice + cross-entropy, focal loss, deep supervision.

Shapes: logits ``(B, K, *spatial)`` (2D or 3D, raw network outputs, not probabilities); targets
``(B, *spatial)`` integer class indices ``0..K-1``. Losses are computed in float32 whatever the
autocast precision of the network.

Ignore label (partial annotation): with ``ignore_index`` (the plan's ``ignore_class``, ``K``) target
voxels holding it contribute nothing to any term: the cross-entropy is averaged over the other voxels
only and the soft Dice counts TP/FP/FN over the other voxels only (their gradient is exactly zero).
Nearest-neighbour target downsampling for deep supervision keeps the index, so every level skips them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def one_hot(target: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, *spatial)`` class indices -> ``(B, K, *spatial)`` one-hot in ``dtype``."""
    out = torch.zeros((target.shape[0], num_classes, *target.shape[1:]), dtype=dtype, device=target.device)
    return out.scatter_(1, target.unsqueeze(1).long(), 1)


def soft_dice_per_class(
    probs: torch.Tensor, target_1h: torch.Tensor, batch_dice: bool = False, smooth: float = 1e-5
) -> torch.Tensor:
    """Soft Dice ``(2 TP + s) / (2 TP + FP + FN + s)`` per class.

    Args:
        probs: softmax probabilities ``(B, K, *spatial)``.
        target_1h: one-hot targets, same shape.
        batch_dice: sum TP/FP/FN over the batch too (one value per class) instead of per sample.
        smooth: added to numerator and denominator.

    Returns:
        ``(K,)`` with ``batch_dice``, else ``(B, K)``.
    """
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0,) + axes
    tp = (probs * target_1h).sum(axes)
    # 2 TP + FP + FN = sum(p) + sum(y)
    denom = probs.sum(axes) + target_1h.sum(axes)
    return (2 * tp + smooth) / (denom + smooth).clamp_min(1e-8)


class SoftDiceLoss(nn.Module):
    """``1 - mean soft Dice`` over the foreground classes (background excluded unless asked for).

    Args:
        batch_dice: one Dice per class over the whole batch (see :func:`soft_dice_per_class`).
        smooth: Dice smoothing (default 1e-5).
        include_background: also average class 0.
        ignore_index: target value of voxels left out of TP/FP/FN (the ignore class), or None.
    """

    def __init__(
        self,
        batch_dice: bool = False,
        smooth: float = 1e-5,
        include_background: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.include_background = include_background
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        probs = torch.softmax(logits.float(), 1)
        if self.ignore_index is None:
            target_1h = one_hot(target, num_classes)
        else:
            keep = (target != self.ignore_index).unsqueeze(1)
            target_1h = one_hot(torch.where(keep.squeeze(1), target, 0), num_classes) * keep
            probs = probs * keep
        dice = soft_dice_per_class(probs, target_1h, self.batch_dice, self.smooth)
        if not self.include_background and num_classes > 1:
            dice = dice[..., 1:]
        return 1.0 - dice.mean()


class CrossEntropyLoss(nn.Module):
    """Cross-entropy with optional class weights, label smoothing and focal modulation.

    With ``focal_gamma > 0`` each voxel's (label-smoothed) cross-entropy is multiplied by
    ``(1 - p_t) ** focal_gamma`` where ``p_t`` is the predicted probability of its true class
    (Lin et al. 2017, "Focal Loss for Dense Object Detection"). Class weights weight each voxel by
    the weight of its true class; the mean is then normalised by the summed weights (as
    ``torch.nn.functional.cross_entropy`` does). Voxels whose target is ``ignore_index`` are left out
    of the mean (a batch with nothing but ignored voxels gives 0).
    """

    class_weights: torch.Tensor | None  # a non-persistent buffer (register_buffer in __init__)

    def __init__(
        self,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        focal_gamma: float = 0.0,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        w = None if class_weights is None else torch.as_tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", w, persistent=False)
        self.label_smoothing = float(label_smoothing)
        self.focal_gamma = float(focal_gamma)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.long()
        w = self.class_weights
        if w is not None and w.numel() != logits.shape[1]:
            raise ValueError(
                f"class_weights has {w.numel()} entries but the network predicts {logits.shape[1]} classes"
            )
        keep = None
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            target = torch.where(keep, target, 0)
        if self.focal_gamma == 0:
            if keep is None:
                return F.cross_entropy(logits, target, weight=w, label_smoothing=self.label_smoothing)
            loss = F.cross_entropy(logits, target, weight=w, label_smoothing=self.label_smoothing, reduction="none")
        else:
            logp = torch.log_softmax(logits, 1)
            logp_t = logp.gather(1, target.unsqueeze(1)).squeeze(1)
            nll = -logp_t
            if self.label_smoothing > 0:
                nll = (1 - self.label_smoothing) * nll - self.label_smoothing * logp.mean(1)
            loss = (1 - logp_t.exp()).clamp_min(0).pow(self.focal_gamma) * nll
            if w is None and keep is None:
                return loss.mean()
            if w is not None:
                loss = loss * w[target]
        # weighted mean over the kept voxels (F.cross_entropy's reduction="none" already applies the weights)
        norm = w[target] if w is not None else torch.ones_like(loss)
        if keep is not None:
            loss, norm = loss * keep, norm * keep
        return loss.sum() / norm.sum().clamp_min(1e-8)


class DiceCELoss(nn.Module):
    """``dice_weight * SoftDiceLoss + ce_weight * CrossEntropyLoss`` on one output.

    Args:
        dice_weight / ce_weight: weights of the two terms.
        batch_dice / smooth: see :class:`SoftDiceLoss`.
        class_weights / label_smoothing / focal_gamma: see :class:`CrossEntropyLoss`.
        ignore_index: target value left out of both terms (the plan's ``ignore_class``), or None.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        batch_dice: bool = False,
        smooth: float = 1e-5,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        focal_gamma: float = 0.0,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.dice = SoftDiceLoss(batch_dice, smooth, ignore_index=ignore_index)
        self.ce = CrossEntropyLoss(class_weights, label_smoothing, focal_gamma, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        if self.ce_weight:
            loss = loss + self.ce_weight * self.ce(logits, target)
        return loss


def deep_supervision_weights(n: int, zero_lowest: bool = False) -> list[float]:
    """Halving weights ``1, 1/2, 1/4, ...`` for ``n`` outputs (full resolution first), summing to 1.

    With ``zero_lowest`` (and ``n > 1``) the lowest-resolution output gets weight 0.
    """
    w = [0.5**i for i in range(n)]
    if zero_lowest and n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [v / total for v in w]


def downsample_target(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour downsampling of class indices ``(B, *spatial)`` to ``(B, *size)``.

    For integer factors this picks the first voxel of every block (a strided view, no copy). Values are
    picked, never mixed, so the ignore class survives at every level.
    """
    size = tuple(int(s) for s in size)
    spatial = tuple(target.shape[1:])
    if spatial == size:
        return target
    if all(a % b == 0 for a, b in zip(spatial, size)):
        idx = (slice(None),) + tuple(slice(None, None, a // b) for a, b in zip(spatial, size))
        return target[idx]
    t = F.interpolate(target.unsqueeze(1).float(), size=size, mode="nearest")
    return t.squeeze(1).to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the outputs of a deep-supervised network.

    Each output ``(B, K, *spatial_i)`` is compared with the target downsampled (nearest) to
    ``spatial_i``. Weights halve per output (full resolution first) and are normalised to sum to 1 (see
    :func:`deep_supervision_weights`). A single tensor is passed to ``loss`` directly.
    """

    def __init__(self, loss: nn.Module, zero_lowest: bool = False) -> None:
        super().__init__()
        self.loss = loss
        self.zero_lowest = zero_lowest

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = deep_supervision_weights(len(outputs), self.zero_lowest)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs):
            if w == 0:
                continue
            total = total + w * self.loss(out, downsample_target(target, out.shape[2:]))
        return total


def hard_dice_counts(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """True positives, false positives and false negatives per class of the argmax prediction.

    Args:
        logits: ``(B, K, *spatial)``.
        target: ``(B, *spatial)`` class indices; voxels outside ``0..K-1`` (the ignore class ``K``)
            are skipped.

    Returns:
        int64 ``(3, K)``: rows TP, FP, FN summed over the batch.
    """
    k = logits.shape[1]
    pred = logits.argmax(1).reshape(-1)
    ref = target.reshape(-1).long().to(pred.device)
    keep = (ref >= 0) & (ref < k)
    if not bool(keep.all()):
        pred, ref = pred[keep], ref[keep]
    joint = torch.bincount(ref * k + pred, minlength=k * k).reshape(k, k)  # [ref, pred]
    tp = joint.diagonal()
    fp = joint.sum(0) - tp
    fn = joint.sum(1) - tp
    return torch.stack([tp, fp, fn]).cpu()
