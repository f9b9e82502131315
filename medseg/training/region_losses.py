"""Region-based training (nnU-Net v2): one sigmoid output per region, soft Dice + BCE.

Shapes: logits ``(B, R, *spatial)`` (raw network outputs, one channel per region, no background
channel); targets ``(B, *spatial)`` integer *class indices* as preprocessing stores them (positions in
``plan.label_ids``; the ignore class ``K = len(label_ids)``). The region targets are built from the class
indices where the loss is taken, i.e. after augmentation and after the deep-supervision downsampling of the
class-index map: a voxel is in region ``r`` iff its class is in ``region_classes[r]``
(:attr:`medseg.planning.plan.Plan.region_classes`).

The loss is nnU-Net's ``DC_and_BCE_loss``: ``dice_weight * (1 - mean soft Dice of the sigmoid
probabilities over the regions) + bce_weight * BCE with logits``. With an ignore class, its voxels are
left out of both terms (the BCE is averaged over the annotated voxels only; the Dice counts TP/FP/FN over
them only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import ConfigError
from medseg.training.losses import soft_dice_per_class


def region_targets(
    target: torch.Tensor, region_classes: Sequence[Sequence[int]], ignore_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Binary region targets of a class-index map.

    Args:
        target: ``(B, *spatial)`` class indices.
        region_classes: per region the class indices it holds.
        ignore_index: class index of unannotated voxels (in no region), or None.

    Returns:
        ``(targets, keep)``: float32 ``(B, R, *spatial)`` with 1 where the voxel lies in the region, and a
        bool ``(B, 1, *spatial)`` mask of annotated voxels (None without ``ignore_index``).
    """
    t = target.long()
    regions = [torch.isin(t, torch.as_tensor(list(c), dtype=torch.long, device=t.device)) for c in region_classes]
    out = torch.stack(regions, 1).float()
    keep = None if ignore_index is None else (t != ignore_index).unsqueeze(1)
    return out, keep


class RegionDiceBCELoss(nn.Module):
    """Soft Dice on sigmoid probabilities + BCE with logits, per region (nnU-Net v2 ``DC_and_BCE_loss``).

    Args:
        region_classes: per region the class indices it holds (``plan.region_classes``).
        dice_weight / bce_weight: weights of the two terms.
        batch_dice: one Dice per region over the whole batch (else per sample, then averaged).
        smooth: Dice smoothing (default 1e-5).
        ignore_index: class index of voxels left out of both terms (``plan.ignore_class``), or None.
    """

    def __init__(
        self,
        region_classes: Sequence[Sequence[int]],
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        batch_dice: bool = False,
        smooth: float = 1e-5,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        if not region_classes:
            raise ValueError("RegionDiceBCELoss needs at least one region")
        self.region_classes = tuple(tuple(int(i) for i in r) for r in region_classes)
        self.dice_weight, self.bce_weight = float(dice_weight), float(bce_weight)
        self.batch_dice, self.smooth, self.ignore_index = batch_dice, smooth, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if logits.shape[1] != len(self.region_classes):
            raise ValueError(
                f"the network predicts {logits.shape[1]} channels but there are {len(self.region_classes)} regions"
            )
        y, keep = region_targets(target, self.region_classes, self.ignore_index)
        loss = logits.new_zeros(())
        if self.dice_weight:
            probs = torch.sigmoid(logits)
            if keep is not None:
                probs, y_d = probs * keep, y * keep
            else:
                y_d = y
            dice = soft_dice_per_class(probs, y_d, self.batch_dice, self.smooth)
            loss = loss + self.dice_weight * (1.0 - dice.mean())
        if self.bce_weight:
            if keep is None:
                bce = F.binary_cross_entropy_with_logits(logits, y)
            else:
                per_voxel = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
                mask = keep.expand_as(per_voxel).float()
                bce = (per_voxel * mask).sum() / mask.sum().clamp_min(1e-8)
            loss = loss + self.bce_weight * bce
        return loss


def region_loss(
    region_classes: Sequence[Sequence[int]],
    *,
    dice_weight: float,
    ce_weight: float,
    batch_dice: bool,
    smooth: float,
    ignore_index: int | None,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
) -> RegionDiceBCELoss:
    """The training loss of a region-based plan; ``ce_weight`` weights the BCE term.

    Raises:
        ConfigError: class weights, label smoothing or focal loss were asked for (softmax-only options).
    """
    unsupported = [
        name
        for name, on in (
            ("class_weights", class_weights is not None),
            ("label_smoothing", label_smoothing != 0),
            ("focal_gamma", focal_gamma != 0),
        )
        if on
    ]
    if unsupported:
        raise ConfigError(
            f"{', '.join(unsupported)} apply to softmax training only; the plan is region-based "
            "(one sigmoid output per region, Dice + BCE)"
        )
    return RegionDiceBCELoss(region_classes, dice_weight, ce_weight, batch_dice, smooth, ignore_index)


def region_dice_counts(
    logits: torch.Tensor,
    target: torch.Tensor,
    region_classes: Sequence[Sequence[int]],
    ignore_index: int | None = None,
    threshold: float = 0.5,
) -> torch.Tensor:
    """TP, FP and FN per region of the prediction ``sigmoid(logits) > threshold``.

    Args:
        logits: ``(B, R, *spatial)``.
        target: ``(B, *spatial)`` class indices.
        region_classes / ignore_index: see :func:`region_targets`; ignored voxels are not counted.
        threshold: probability above which a voxel is predicted in the region.

    Returns:
        int64 ``(3, R)``: rows TP, FP, FN summed over the batch (on the CPU).
    """
    y, keep = region_targets(target.to(logits.device), region_classes, ignore_index)
    y = y.bool()
    pred = torch.sigmoid(logits.float()) > threshold
    if keep is not None:
        pred, y = pred & keep, y & keep
    axes = (0,) + tuple(range(2, logits.ndim))
    tp = (pred & y).sum(axes)
    fp = (pred & ~y).sum(axes)
    fn = (~pred & y).sum(axes)
    return torch.stack([tp, fp, fn]).long().cpu()


__all__ = ["RegionDiceBCELoss", "region_dice_counts", "region_loss", "region_targets"]
