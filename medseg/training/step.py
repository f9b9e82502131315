"""One training step: the loss and optimizer a run trains with, and the optimizer step itself.

A step runs the forward under autocast, the deep-supervised Dice + CE loss in float32, the backward (with
gradient scaling for CUDA fp16), gradient clipping and the optimizer step. A step whose gradients are not
finite leaves the weights untouched; :data:`MAX_SKIPPED_IN_A_ROW` such steps in a row stop the run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.distributed import DistContext
from medseg.errors import ConfigError, TrainingError
from medseg.options import Optimizer
from medseg.planning.plan import Plan
from medseg.planning.stage import Stage
from medseg.training.config import TrainConfig
from medseg.training.device import autocast, channels_last_format
from medseg.training.lookahead import Lookahead
from medseg.training.losses import DeepSupervisionLoss, DiceCELoss
from medseg.training.region_losses import region_loss
from medseg.training.run_defaults import LOOKAHEAD_INNER, base_optimizer

logger = logging.getLogger(__name__)

MAX_SKIPPED_IN_A_ROW = 20  # optimizer steps with non-finite gradients before training stops (diverged)


def build_loss(cfg: TrainConfig, plan: Plan) -> DeepSupervisionLoss:
    """The deep-supervised loss of a run: Dice + CE over labels, or over the regions of a region-based plan.

    Raises:
        ConfigError: ``class_weights`` do not match the plan's classes.
    """
    loss_options: dict[str, Any] = dict(
        dice_weight=cfg.dice_weight,
        ce_weight=cfg.ce_weight,
        batch_dice=cfg.batch_dice,
        smooth=cfg.dice_smooth,
        class_weights=cfg.class_weights,
        label_smoothing=cfg.label_smoothing,
        focal_gamma=cfg.focal_gamma,
        ignore_index=plan.ignore_class,
    )
    base_loss = region_loss(plan.region_classes, **loss_options) if plan.is_region_based else DiceCELoss(**loss_options)
    if cfg.class_weights is not None and len(cfg.class_weights) != plan.num_classes:
        raise ConfigError(
            f"class_weights has {len(cfg.class_weights)} values but the plan has {plan.num_classes} classes"
        )
    return DeepSupervisionLoss(base_loss)


def build_model(
    stage: Stage, device: torch.device, channels_last: bool, dist_ctx: DistContext
) -> tuple[nn.Module, nn.Module]:
    """The stage's network on ``device`` (channels-last when asked) and the module the run trains: the network
    itself, or its ``DistributedDataParallel`` wrapper under DDP."""
    model = stage.network.build(stage.in_channels, stage.num_classes).to(device)
    if channels_last:
        # Module.to takes memory_format at run time; torch's overloads of Module.to leave it out
        model = model.to(memory_format=channels_last_format(len(stage.patch_size)))  # type: ignore[call-overload]
    if not dist_ctx.enabled:
        return model, model
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, wrapped


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW at the resolved learning rate of ``cfg`` (``cfg.resolved()``), inside
    :class:`~medseg.training.lookahead.Lookahead` (``lookahead_k``, ``lookahead_alpha``) for the
    ``lookahead-*`` optimizers."""
    opt = cfg.resolved()
    lr, momentum = opt.lr, opt.momentum
    assert lr is not None and momentum is not None  # resolved() sets both
    inner: torch.optim.Optimizer
    if base_optimizer(opt.optimizer) == Optimizer.SGD:
        inner = torch.optim.SGD(
            model.parameters(),
            lr=float(lr),
            momentum=momentum,
            nesterov=cfg.nesterov and momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    else:
        inner = torch.optim.AdamW(model.parameters(), lr=float(lr), weight_decay=cfg.weight_decay)
    if opt.optimizer in LOOKAHEAD_INNER:
        return Lookahead(inner, k=cfg.lookahead_k, alpha=cfg.lookahead_alpha)
    return inner


class OptimizerStep:
    """Runs optimizer steps on batches and counts the ones skipped for non-finite gradients.

    Args:
        model / loss_fn / optimizer: what is trained.
        scaler: gradient scaler (CUDA fp16) or None.
        device / amp_dtype: autocast settings.
        dist: distributed context; ``local_batch`` / ``batch_size``: this rank's and the global batch.
        grad_clip: clip gradients to this global norm (0 = no clipping).
        precision: the run's precision (for the divergence message).
        latest: the run's ``checkpoint_latest.pt`` (for the divergence message).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        dist: DistContext,
        local_batch: int,
        batch_size: int,
        grad_clip: float,
        precision: str,
        latest: Path,
    ) -> None:
        self.model, self.loss_fn, self.optimizer, self.scaler = model, loss_fn, optimizer, scaler
        self.device, self.amp_dtype, self.grad_clip = device, amp_dtype, grad_clip
        # DDP averages gradients over ranks; weight by the rank's share so uneven splits stay exact
        self.scale = local_batch * dist.world_size / batch_size
        self.precision, self.latest = precision, latest
        self.skipped = 0  # optimizer steps skipped for non-finite gradients, this session
        self.skipped_in_a_row = 0

    def __call__(self, x: torch.Tensor, y: Any, iteration: int) -> float:
        """One optimizer step on a batch (``iteration``: the run's iterations done before it).

        Returns:
            The loss (mean over this rank's samples).

        Raises:
            TrainingError: the training diverged (see :meth:`skip`).
        """
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            outputs = self.model(x)
        loss = self.loss_fn(outputs, y)
        scaled = loss * self.scale if self.scale != 1 else loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            scaled.backward()
        norm = self.grad_norm()
        if self.scaler is not None:  # the scaler skips steps with inf/NaN gradients itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif torch.isfinite(norm):
            self.optimizer.step()
            self.skipped_in_a_row = 0
        else:
            self.skip(float(norm), iteration)
        return float(loss.detach())

    def grad_norm(self) -> torch.Tensor:
        """The gradients' global L2 norm, after clipping them to ``grad_clip`` when it is positive."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            return nn.utils.clip_grad_norm_(params, self.grad_clip)
        if not params:
            return torch.zeros(())
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for p in params if (g := p.grad) is not None])
        )

    def skip(self, norm: float, iteration: int) -> None:
        """Leave the weights untouched after a step with non-finite gradients (one bad batch, a numerical
        overflow) instead of writing NaN into every weight; stop after MAX_SKIPPED_IN_A_ROW such steps in a row.

        Raises:
            TrainingError: the training diverged (the weights of checkpoint_latest are still finite).
        """
        self.skipped += 1
        self.skipped_in_a_row += 1
        logger.warning(
            "iteration %d: gradient norm %s, the optimizer step was skipped (%d skipped so far)",
            iteration + 1,
            norm,
            self.skipped,
        )
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            hint = " or train with --precision fp32" if self.precision != "fp32" else ""
            raise TrainingError(
                f"training diverged: {self.skipped_in_a_row} optimizer steps in a row had non-finite gradients "
                f"(iteration {iteration + 1}, precision {self.precision}, learning rate "
                f"{self.optimizer.param_groups[0]['lr']:.3g}); {self.latest} holds the "
                f"last finite weights: lower the learning rate{hint}"
            )


__all__ = ["MAX_SKIPPED_IN_A_ROW", "OptimizerStep", "build_loss", "build_optimizer"]
