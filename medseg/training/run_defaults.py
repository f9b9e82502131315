"""The defaults a training run's settings take when left unset, by kind of run, with the evidence.

A time-budgeted run (``--time-budget``: one or two thousand iterations on a CPU) and an epoch-based one
(nnU-Net's 250k iterations) want different optimizers, learning rates, averaging and augmentation;
:meth:`medseg.training.config.TrainConfig.resolved` picks from here. :func:`base_optimizer` names the
optimizer a Lookahead wrapper (:mod:`medseg.training.lookahead`) runs inside.
"""

from __future__ import annotations

from medseg.options import Optimizer, WeightAveraging

#: ``weight_averaging`` of a time-budgeted run when it is ``auto``. On the hippocampus data (AVX2 path, 16
#: features, fold 0 of 180 cases + 20 held-out cases, two budgets, three runs), the average against the raw
#: weights of the same run: +0.0011 / +0.0011 and +0.0010 / -0.0002 (30 min, seed 0); over 112 case pairs of
#: two 21.5-minute seeds +0.0008 / +0.0010 per case (paired t 1.7 / 2.1, 61 of 112 cases better); docs/
#: benchmarks.md. Small but in 11 of 12 class means; an update takes 0.2 ms against a 330 ms step (16f, 1.4M
#: weights), and an EMA over the annealed end of a run has no statistics to go stale (instance norm). Epoch-based runs keep nnU-Net's raw final weights.
SHORT_SCHEDULE_WEIGHT_AVERAGING = WeightAveraging.EMA

#: Optimizer settings of a time-budgeted run when ``optimizer="auto"``. nnU-Net's SGD (Nesterov momentum
#: 0.99, lr 1e-2) is made for 250k iterations; a budget on a CPU allows one or two thousand. Measured on the
#: hippocampus data (16 base features, batch 2, fp32, 300 iterations with the learning rate annealed to
#: 0): SGD 0.99 / 1e-2 still predicted only background (pseudo Dice 0.00), AdamW 3e-3 reached 0.43 after
#: 50 iterations and 0.81 after 300, SGD 0.9 / 3e-2 0.00 after 50 and 0.81 after 250.
SHORT_SCHEDULE_OPTIMIZER = Optimizer.ADAMW
SHORT_SCHEDULE_LR = {Optimizer.SGD: 3e-2, Optimizer.ADAMW: 3e-3}
SHORT_SCHEDULE_MOMENTUM = 0.9
#: The epoch-based (full-schedule) defaults: nnU-Net's.
LONG_SCHEDULE_LR = {Optimizer.SGD: 1e-2, Optimizer.ADAMW: 1e-3}
LONG_SCHEDULE_MOMENTUM = 0.99
#: Intensity augmentation (noise, blur, brightness, contrast, low resolution, gamma) of a time-budgeted run
#: when ``AugmentationConfig.intensity`` is None and the run's training data decide nothing (a configuration
#: resolved on its own; :func:`medseg.training.train` decides from the data with
#: :mod:`medseg.training.intensity_rule`, which keeps this choice only for homogeneous data). These transforms regularise a model that would otherwise
#: overfit in nnU-Net's 250k iterations; a budget of one or two thousand iterations ends long before that,
#: and there they cost fit. Measured on the hippocampus data (30 minutes, 24 base features, batch 4, bf16,
#: fold 0, 40 validation cases; spatial transforms and mirroring kept; shift TTA): mean final validation
#: Dice with these transforms -> without, 0.8862 -> 0.8901 (seed 12345) and 0.8866 -> 0.8869 (seed 7);
#: the table is in README ("The laptop-CPU path").
SHORT_SCHEDULE_INTENSITY_AUGMENTATION = False

#: The optimizer inside each Lookahead wrapper (:mod:`medseg.training.lookahead`).
LOOKAHEAD_INNER = {Optimizer.LOOKAHEAD_SGD: Optimizer.SGD, Optimizer.LOOKAHEAD_ADAMW: Optimizer.ADAMW}


def base_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer that computes the steps: ``optimizer`` itself, or the one a Lookahead variant wraps
    (``lookahead-adamw`` -> ``adamw``); its learning-rate and momentum defaults are the run's."""
    return LOOKAHEAD_INNER.get(optimizer, optimizer)


__all__ = [
    "LONG_SCHEDULE_LR",
    "LONG_SCHEDULE_MOMENTUM",
    "LOOKAHEAD_INNER",
    "SHORT_SCHEDULE_INTENSITY_AUGMENTATION",
    "SHORT_SCHEDULE_LR",
    "SHORT_SCHEDULE_MOMENTUM",
    "SHORT_SCHEDULE_OPTIMIZER",
    "SHORT_SCHEDULE_WEIGHT_AVERAGING",
    "base_optimizer",
]
