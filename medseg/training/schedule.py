"""Learning-rate schedules as pure functions of training progress.

Progress is ``iteration / total_iterations`` for epoch-based training and ``elapsed / budget`` (wall-clock
seconds) for time-budgeted training, so that a short budget still anneals the learning rate to zero
and ends with a converged model. Being stateless, the schedules resume exactly.

The cosine schedule with warm restarts (SGDR) also says where its cycles end (:func:`cycle_ends`,
:func:`completed_cycles`): a snapshot ensemble (``--snapshots N``) saves the weights there, each a model
annealed to a learning rate near zero.
"""

from __future__ import annotations

import math

from medseg.options import LRSchedule


def poly_factor(progress: float, power: float = 0.9) -> float:
    """``(1 - progress) ** power``, progress clipped to [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    return (1.0 - p) ** power


def cycle_ends(cycles: int = 3, growth: float = 2.0) -> list[float]:
    """Progress (in (0, 1]) at which each of ``cycles`` cosine cycles ends; the last ends at 1.

    Each cycle is ``growth`` times as long as the previous one (1: equal cycles).
    """
    lengths = [growth**i for i in range(cycles)]
    total = sum(lengths)
    ends, done = [], 0.0
    for length in lengths[:-1]:
        done += length
        ends.append(done / total)
    return [*ends, 1.0]


def completed_cycles(progress: float, cycles: int = 3, growth: float = 2.0) -> int:
    """How many cycles have ended at ``progress`` (0 ... ``cycles``; the last one only at progress >= 1)."""
    return sum(progress >= end for end in cycle_ends(cycles, growth))


def cosine_restarts_factor(progress: float, cycles: int = 3, growth: float = 2.0) -> float:
    """Cosine annealing with warm restarts (Loshchilov & Hutter 2017, SGDR).

    ``cycles`` cycles, each ``growth`` times as long as the previous one (1: equal cycles, as in snapshot
    ensembles, Huang et al. 2017), together spanning the whole training; within a cycle the factor falls from
    1 to 0 along half a cosine. The last cycle ends at progress 1.
    """
    p = min(max(progress, 0.0), 1.0)
    ends = cycle_ends(cycles, growth)
    index = min(completed_cycles(p, cycles, growth), cycles - 1)
    start = ends[index - 1] if index > 0 else 0.0
    local = min((p - start) / (ends[index] - start), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * local))


def lr_factor(
    schedule: str, progress: float, poly_power: float = 0.9, cosine_cycles: int = 3, cycle_growth: float = 2.0
) -> float:
    """Factor applied to the initial learning rate at ``progress`` in [0, 1].

    Raises:
        ValueError: unknown ``schedule``.
    """
    if schedule == LRSchedule.POLY:
        return poly_factor(progress, poly_power)
    if schedule == LRSchedule.COSINE_RESTARTS:
        return cosine_restarts_factor(progress, cosine_cycles, cycle_growth)
    raise ValueError(f"unknown lr schedule {schedule!r}; use 'poly' or 'cosine_restarts'")
