"""Learning-rate schedules as pure functions of training progress.

Progress is ``iteration / total_iterations`` for epoch-based training and ``elapsed / budget`` (wall-clock
seconds) for time-budgeted training, so that a short budget still anneals the learning rate to zero
and ends with a converged model. Being stateless, the schedules resume exactly.
"""

from __future__ import annotations

import math

from medseg.options import LRSchedule


def poly_factor(progress: float, power: float = 0.9) -> float:
    """``(1 - progress) ** power``, progress clipped to [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    return (1.0 - p) ** power


def cosine_restarts_factor(progress: float, cycles: int = 3) -> float:
    """Cosine annealing with warm restarts (Loshchilov & Hutter 2017, SGDR).

    ``cycles`` cycles, each twice as long as the previous one, together spanning the whole training;
    within a cycle the factor falls from 1 to 0 along half a cosine. The last cycle ends at progress 1.
    """
    p = min(max(progress, 0.0), 1.0)
    total = 2**cycles - 1  # cycle lengths 1, 2, 4, ... in units of the first cycle
    t = p * total
    start, length = 0.0, 1.0
    while t >= start + length and length < 2 ** (cycles - 1):
        start += length
        length *= 2
    local = min((t - start) / length, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * local))


def lr_factor(schedule: str, progress: float, poly_power: float = 0.9, cosine_cycles: int = 3) -> float:
    """Factor applied to the initial learning rate at ``progress`` in [0, 1].

    Raises:
        ValueError: unknown ``schedule``.
    """
    if schedule == LRSchedule.POLY:
        return poly_factor(progress, poly_power)
    if schedule == LRSchedule.COSINE_RESTARTS:
        return cosine_restarts_factor(progress, cosine_cycles)
    raise ValueError(f"unknown lr schedule {schedule!r}; use 'poly' or 'cosine_restarts'")
