"""Training settings: :class:`TrainConfig` and its augmentation part, saved as ``run_dir/config.json``.

Every option that changes what a run learns lives here, so a run folder records how it was trained.
Variants are made with :func:`dataclasses.replace`; the command line only fills fields in.
:func:`medseg.training.run_stage.run_plan` applies the settings that override the plan (batch size, deep
supervision, mirrored axes) to the plan a run stores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError
from medseg.io.codec import from_json_dict, to_json_dict
from medseg.io.json_files import load_json_file
from medseg.io.workdir import fold_name
from medseg.options import DeviceKind, LRSchedule, Optimizer, Precision, WeightAveraging, choices
from medseg.training.distill_config import DistillConfig
from medseg.training.run_defaults import (
    LONG_SCHEDULE_LR,
    LONG_SCHEDULE_MOMENTUM,
    SHORT_SCHEDULE_INTENSITY_AUGMENTATION,
    SHORT_SCHEDULE_LR,
    SHORT_SCHEDULE_MOMENTUM,
    SHORT_SCHEDULE_OPTIMIZER,
    SHORT_SCHEDULE_WEIGHT_AVERAGING,
    base_optimizer,
)
from medseg.training.run_record import RUN_RECORD_KEYS


@dataclass(frozen=True)
class AugmentationConfig:
    """On-the-fly data augmentation of training patches.

    Probabilities are per sample. Spatial transforms (scaling, rotation, elastic deformation and
    mirroring) are applied in one resampling of the patch; intensity transforms afterwards, vectorised
    over the batch. For anisotropic data (see ``anisotropy_threshold``) and 2D patches rotation happens
    in-plane only (around the Z axis).

    Attributes:
        enabled: False switches every augmentation off (mirroring included).
        intensity: the intensity transforms (``p_noise`` ... ``p_gamma_inverted``) on or off; None = on
            for epoch-based runs; a time-budgeted one decides from its training cases
            (:mod:`medseg.training.intensity_rule`: off only where label intensities are alike across cases);
            :meth:`TrainConfig.resolved` makes it concrete. Spatial transforms and mirroring are not
            affected.
        p_scale: probability of random zoom; ``scale_range`` is the zoom factor of the content
            (``< 1`` zooms out, showing more context).
        p_rotation: probability of a random rotation of up to ``rotation_degrees`` around each axis
            (3D, isotropic data) or around the Z axis only (2D patches, anisotropic data; there up to
            ``rotation_degrees_inplane``).
        p_elastic: probability of a smooth random deformation (``elastic_alpha`` voxels of maximal
            displacement, on a control grid every ``elastic_sigma`` voxels); off by default.
        mirror_axes: spatial axes of the patch mirrored with probability 0.5 each; None = those of the plan
            (``ConfigurationPlan.mirror_axes``: every axis unless the planner found classes in a fixed order).
        p_noise / noise_variance: additive Gaussian noise with a variance drawn from the range.
        p_blur / blur_sigma: Gaussian blur with sigma (voxels) drawn from the range.
        p_brightness / brightness_range: multiplicative intensity factor.
        p_contrast / contrast_range: contrast factor around the patch mean, clipped to the original range.
        p_lowres / lowres_range: simulate a lower resolution (downsample by a factor from the range,
            nearest; upsample back, linear).
        p_gamma / p_gamma_inverted / gamma_range: gamma on the patch rescaled to [0, 1] (inverted:
            on the negated image), mean and std restored afterwards.
        anisotropy_threshold: a patch whose Z spacing is this many times the in-plane spacing gets
            in-plane rotation only.
        previous_stage_perturbation: degrade a cascade's previous-stage channels at random (morphology,
            removal of a component; :func:`medseg.training.augmentation.perturb_previous_stage`).
    """

    enabled: bool = True
    intensity: bool | None = None
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_rotation: float = 0.2
    rotation_degrees: float = 30.0
    rotation_degrees_inplane: float = 180.0
    p_elastic: float = 0.0
    elastic_alpha: float = 6.0
    elastic_sigma: float = 10.0
    mirror_axes: tuple[int, ...] | None = None
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_range: tuple[float, float] = (0.5, 1.0)
    p_gamma: float = 0.3
    p_gamma_inverted: float = 0.1
    gamma_range: tuple[float, float] = (0.7, 1.5)
    anisotropy_threshold: float = 3.0
    previous_stage_perturbation: bool = True

    def check(self) -> list[str]:
        problems = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("p_") and not (0.0 <= v <= 1.0):
                problems.append(f"augmentation.{f.name} must be a probability in [0, 1], got {v}")
            if f.name.endswith(("_range", "_variance", "_sigma")) and isinstance(v, tuple):
                if len(v) != 2 or v[0] > v[1]:
                    problems.append(f"augmentation.{f.name} must be (low, high) with low <= high, got {list(v)}")
        if self.scale_range[0] <= 0:
            problems.append(f"augmentation.scale_range must be positive, got {list(self.scale_range)}")
        if self.lowres_range[0] <= 0 or self.lowres_range[1] > 1:
            problems.append(f"augmentation.lowres_range must lie in (0, 1], got {list(self.lowres_range)}")
        if self.gamma_range[0] <= 0:
            problems.append(f"augmentation.gamma_range must be positive, got {list(self.gamma_range)}")
        return problems


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run besides the plan and the data.

    Attributes:
        configuration: plan configuration (``3d_fullres``, ``2d``, ...); None = the plan's default.
        arch: architecture; None = the configuration's default.
        fold: cross-validation fold ``0..4`` (``WORK/splits.json``) or ``"all"`` (train on every case).
        epochs: number of epochs; None = 1000, or as many as the time budget allows when there is one.
        iters_per_epoch: optimizer steps per epoch (an epoch is a logging/checkpoint unit).
        val_iters: batches of held-out patches evaluated per epoch for the pseudo Dice.
        time_budget_minutes: train for this wall-clock time (whole run: refitting the plan, training,
            checkpoints, per-epoch validation and the final sliding-window validation, which is estimated,
            reserved and shortened to fit); the learning rate is annealed over elapsed time. None = the
            plan's time budget, if it has one, else epochs.
        keep_plan: with a time budget, train the plan's network even when the plan is not fitted to this
            budget and device (default: refit it, :mod:`medseg.training.budget_refit`); a warning then gives
            the iterations to expect.
        pretrained: start from these weights: a model bundle (``model.zip`` from ``medseg export``) or a
            medseg run checkpoint (``checkpoint_*.pt``), or for an architecture wrapping a MONAI network a
            plain state dict of it (:mod:`medseg.training.pretrained_source`); every tensor whose name and
            shape match the network is loaded, the rest (a first layer for other channels, heads for other
            classes) keeps its fresh initialisation (:mod:`medseg.training.pretrained`). With a time budget
            the plan's network is trained as it is (no refit). A resumed run continues from its checkpoint,
            never from these.
        optimizer: ``sgd`` (Nesterov), ``adamw`` or ``auto``: SGD for epoch-based runs, AdamW for
            time-budgeted runs (see :data:`SHORT_SCHEDULE_OPTIMIZER`); ``lookahead-sgd`` / ``lookahead-adamw``:
            that optimizer inside Lookahead (:mod:`medseg.training.lookahead`; its defaults are the inner
            optimizer's). :meth:`resolved` makes it concrete; a run's ``config.json`` holds the resolved value.
        lookahead_k / lookahead_alpha: Lookahead's inner steps per synchronisation and slow-weight step size.
        lr: initial learning rate; None = 1e-2 for SGD, 1e-3 for AdamW in epoch-based runs, 3e-2 and 3e-3
            in time-budgeted runs.
        momentum: SGD momentum; None = 0.99 in epoch-based runs, 0.9 in time-budgeted runs.
        nesterov / weight_decay: optimizer settings.
        lr_schedule: ``poly`` (``lr0 * (1 - progress) ** poly_power``) or ``cosine_restarts`` (cosine
            annealing with ``cosine_cycles`` warm restarts, each cycle ``cosine_cycle_growth`` times as long
            as the previous one (1: equal cycles), the last ending with the training).
        snapshots: with ``cosine_restarts``, save the weights at the end of each cycle as
            ``checkpoint_snapshot_<i>.pt`` (``i`` = 1 ... ``cosine_cycles``) for a snapshot ensemble.
        grad_clip: maximal gradient norm (0 = no clipping).
        dice_weight / ce_weight: weights of the soft Dice and cross-entropy terms.
        batch_dice: compute Dice over the whole batch instead of per sample.
        dice_smooth: smoothing of the soft Dice.
        focal_gamma: > 0 replaces cross-entropy by the focal loss with this focusing parameter.
        class_weights: per-class weights of the cross-entropy (``K`` values, background included).
        label_smoothing: cross-entropy label smoothing.
        deep_supervision: train with the network's auxiliary outputs (if the plan enables them).
        precision: ``auto`` (CPU: bf16 autocast when the CPU has native bf16 - AMX/AVX512-BF16 - else
            fp32; CUDA: fp16 AMP with gradient scaling), ``fp32``, ``bf16`` or ``fp16``.
        channels_last: channels-last memory format; None = on for the CPU, where it speeds convolutions
            up, off on CUDA.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        num_workers: background processes producing augmented batches; None = automatic (none on
            CPUs with at most 2 cores, where batches are made between steps; about one per 4 cores
            otherwise; up to 8 beside a GPU).
        num_threads: torch intra-op threads of the training process; None = automatic: the cores of
            the machine (of this rank under torchrun) not given to data workers, reduced while
            training runs when other processes share the cores and fewer threads step faster.
        seed: seeds the network initialisation and every sampled patch (batch ``i`` is a function of
            ``seed`` and ``i`` only, so resuming and multi-process training see the same data).
        foreground_oversample: fraction of each batch forced to contain foreground.
        deterministic: deterministic algorithms (slower; for tests and debugging).
        batch_size: override of the plan's batch size (global batch across processes).
        ema_alpha: smoothing of the pseudo Dice (``ema = alpha * ema + (1 - alpha) * dice``).
        final_validation: predict the held-out cases with the full sliding window at the end.
        validation_tta: mirror test-time augmentation in the final validation.
        save_probabilities: write ``validation/<case>.npz`` softmax probabilities (float16).
        augmentation: see :class:`AugmentationConfig`.
        weight_averaging: ``ema``: an exponential moving average of the weights over the last part of the
            run becomes ``checkpoint_final`` (:mod:`medseg.training.weight_averaging`); ``off``: the last
            weights do; ``auto``: :data:`SHORT_SCHEDULE_WEIGHT_AVERAGING` for a time-budgeted run, else
            ``off`` (:meth:`TrainConfig.resolved` makes it concrete).
        distill: train on a teacher ensemble's soft predictions too (:mod:`medseg.training.distillation`).
    """

    configuration: str | None = None
    arch: str | None = None
    fold: int | str = 0
    epochs: int | None = None
    iters_per_epoch: int = 250
    val_iters: int = 20
    time_budget_minutes: float | None = None
    keep_plan: bool = False
    pretrained: str | None = None
    optimizer: Optimizer = Optimizer.AUTO
    lr: float | None = None
    momentum: float | None = None
    nesterov: bool = True
    weight_decay: float = 3e-5
    lr_schedule: LRSchedule = LRSchedule.POLY
    poly_power: float = 0.9
    cosine_cycles: int = 3
    cosine_cycle_growth: float = 2.0
    snapshots: bool = False
    lookahead_k: int = 5
    lookahead_alpha: float = 0.5
    grad_clip: float = 12.0
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    batch_dice: bool = False
    dice_smooth: float = 1e-5
    focal_gamma: float = 0.0
    class_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    deep_supervision: bool = True
    precision: Precision = Precision.AUTO
    channels_last: bool | None = None
    device: str = "cpu"
    num_workers: int | None = None
    num_threads: int | None = None
    seed: int = 12345
    foreground_oversample: float = 0.33
    deterministic: bool = False
    batch_size: int | None = None
    ema_alpha: float = 0.9
    final_validation: bool = True
    validation_tta: bool = True
    save_probabilities: bool = True
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    weight_averaging: WeightAveraging = WeightAveraging.AUTO
    distill: DistillConfig | None = None

    # ------------------------------------------------------------------ checks
    def check(self) -> list[str]:
        """Every invalid value, one message each (empty when the configuration is valid)."""
        p: list[str] = []
        if not (
            self.fold == "all" or (isinstance(self.fold, int) and not isinstance(self.fold, bool) and self.fold >= 0)
        ):
            p.append(f"fold must be a non-negative integer or 'all', got {self.fold!r}")
        if self.epochs is not None and self.epochs < 1:
            p.append(f"epochs must be >= 1, got {self.epochs}")
        if self.iters_per_epoch < 1:
            p.append(f"iters_per_epoch must be >= 1, got {self.iters_per_epoch}")
        if self.val_iters < 0:
            p.append(f"val_iters must be >= 0, got {self.val_iters}")
        if self.time_budget_minutes is not None and not self.time_budget_minutes > 0:
            p.append(f"time_budget_minutes must be positive, got {self.time_budget_minutes}")
        if self.pretrained is not None and not (isinstance(self.pretrained, str) and self.pretrained.strip()):
            p.append(f"pretrained must be the path of a model bundle or checkpoint, got {self.pretrained!r}")
        if self.weight_averaging not in choices(WeightAveraging):
            p.append(f"weight_averaging must be one of {choices(WeightAveraging)}, got {self.weight_averaging!r}")
        if self.optimizer not in choices(Optimizer):
            p.append(f"optimizer must be one of {choices(Optimizer)}, got {self.optimizer!r}")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            p.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.lr is not None and not self.lr > 0:
            p.append(f"lr must be positive, got {self.lr}")
        if self.lr_schedule not in choices(LRSchedule):
            p.append(f"lr_schedule must be one of {choices(LRSchedule)}, got {self.lr_schedule!r}")
        if self.cosine_cycles < 1 or not self.cosine_cycle_growth > 0:
            p.append(
                f"cosine_cycles must be >= 1, cosine_cycle_growth > 0: {self.cosine_cycles}, {self.cosine_cycle_growth}"
            )
        if self.snapshots and self.lr_schedule != LRSchedule.COSINE_RESTARTS:
            p.append(f"snapshots need lr_schedule 'cosine_restarts' (a snapshot per cycle), got {self.lr_schedule!r}")
        if self.lookahead_k < 1 or not 0 < self.lookahead_alpha <= 1:
            p.append(f"lookahead_k must be >= 1, lookahead_alpha in (0, 1]: {self.lookahead_k}, {self.lookahead_alpha}")
        if self.precision not in choices(Precision):
            p.append(f"precision must be one of {choices(Precision)}, got {self.precision!r}")
        if self.grad_clip < 0:
            p.append(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.dice_weight < 0 or self.ce_weight < 0 or self.dice_weight + self.ce_weight == 0:
            p.append(f"dice_weight and ce_weight must be >= 0 and not both 0, got {self.dice_weight}, {self.ce_weight}")
        if self.focal_gamma < 0:
            p.append(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if not 0 <= self.label_smoothing < 1:
            p.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.class_weights is not None and any(w < 0 for w in self.class_weights):
            p.append(f"class_weights must be >= 0, got {list(self.class_weights)}")
        if not 0 <= self.foreground_oversample <= 1:
            p.append(f"foreground_oversample must be in [0, 1], got {self.foreground_oversample}")
        if self.num_workers is not None and self.num_workers < 0:
            p.append(f"num_workers must be >= 0, got {self.num_workers}")
        if self.num_threads is not None and self.num_threads < 1:
            p.append(f"num_threads must be >= 1, got {self.num_threads}")
        if self.batch_size is not None and self.batch_size < 1:
            p.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.ema_alpha < 1:
            p.append(f"ema_alpha must be in [0, 1), got {self.ema_alpha}")
        if not (self.device == DeviceKind.CPU or self.device.startswith(DeviceKind.CUDA)):
            p.append(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        p += self.augmentation.check() + (self.distill.check() if self.distill else [])
        return p

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` listing every invalid value; return self otherwise."""
        problems = self.check()
        if problems:
            raise ConfigError("invalid training configuration:\n" + "\n".join(f"  - {x}" for x in problems))
        return self

    @property
    def fold_name(self) -> str:
        """``fold_0`` ... or ``fold_all``."""
        return fold_name(self.fold)

    @property
    def short_schedule(self) -> bool:
        """Whether this is a time-budgeted run (a few thousand iterations at most)."""
        return self.time_budget_minutes is not None

    def resolved(self, short_schedule_intensity: bool | None = None) -> TrainConfig:
        """This configuration with a concrete ``optimizer``, ``lr``, ``momentum``, intensity augmentation and
        weight averaging (idempotent).

        ``optimizer="auto"`` becomes :data:`SHORT_SCHEDULE_OPTIMIZER` for a time-budgeted run, else
        ``sgd``; an unset ``lr``/``momentum`` becomes the default of that optimizer and schedule; an unset
        ``augmentation.intensity`` becomes ``short_schedule_intensity`` for a time-budgeted run (the
        training data's choice, :func:`medseg.training.intensity_rule.decide_intensity_augmentation`; when
        None, :data:`SHORT_SCHEDULE_INTENSITY_AUGMENTATION`), else True; ``weight_averaging="auto"`` becomes
        :data:`SHORT_SCHEDULE_WEIGHT_AVERAGING` for a time-budgeted run, else ``off``.
        """
        short = self.short_schedule
        optimizer = (
            self.optimizer
            if self.optimizer != Optimizer.AUTO
            else (SHORT_SCHEDULE_OPTIMIZER if short else Optimizer.SGD)
        )
        defaults = SHORT_SCHEDULE_LR if short else LONG_SCHEDULE_LR
        lr = self.lr if self.lr is not None else defaults[base_optimizer(optimizer)]
        momentum = (
            self.momentum
            if self.momentum is not None
            else (SHORT_SCHEDULE_MOMENTUM if short else LONG_SCHEDULE_MOMENTUM)
        )
        aug = self.augmentation
        if aug.intensity is None:
            if not short:
                intensity = True
            elif short_schedule_intensity is not None:
                intensity = short_schedule_intensity
            else:
                intensity = SHORT_SCHEDULE_INTENSITY_AUGMENTATION
            aug = dataclasses.replace(aug, intensity=intensity)
        averaging = self.weight_averaging
        if averaging == WeightAveraging.AUTO:
            averaging = SHORT_SCHEDULE_WEIGHT_AVERAGING if short else WeightAveraging.OFF
        return dataclasses.replace(
            self,
            optimizer=optimizer,
            lr=float(lr),
            momentum=float(momentum),
            augmentation=aug,
            weight_averaging=averaging,
        )

    @property
    def effective_lr(self) -> float:
        """The initial learning rate (explicit, or the default of the optimizer and schedule)."""
        lr = self.resolved().lr
        assert lr is not None  # resolved() sets it
        return float(lr)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of Python builtins (tuples become lists, options their strings)."""
        return to_json_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "training configuration") -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys or wrong types raise :class:`ConfigError`.

        The keys of what a run did (:data:`~medseg.training.run_record.RUN_RECORD_KEYS`), which a
        ``config.json`` (or a checkpoint's ``train_config``) written before the run record held, are left
        out: :func:`~medseg.training.run_record.RunRecord.from_config_dict` reads them.
        """
        if isinstance(d, dict) and any(k in d for k in RUN_RECORD_KEYS):
            d = {k: v for k, v in d.items() if k not in RUN_RECORD_KEYS}
        return from_json_dict(cls, d, where, ConfigError)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read ``config.json``; a missing or malformed file raises :class:`ConfigError` naming it."""
        return load_json_file(path, cls.from_dict, "training configuration", ConfigError)
