"""The budget fit's rule: its constants, predicted step times and the choice among measured candidates.

See :mod:`medseg.planning.budget` for the whole fit. Patch sizes are ``(Z, Y, X)`` (``(Y, X)`` for 2D),
times in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medseg.errors import PlanError
from medseg.planning.candidates import Candidate

#: Fraction of the budget spent on training iterations; the rest is left for the per-epoch validation,
#: checkpoints and data-loading stalls.
USABLE_FRACTION = 0.9
#: Training samples (iterations x batch) a 3D candidate must reach in the budget to count as converging.
#: nnU-Net trains 250k iterations (500k patches at batch 2), far past the point where its Dice stops
#: improving. medseg's experience on hippocampus-size images (patch covering the whole image) is that a
#: 16-feature 3D U-Net with a learning rate annealed over the run reaches its plateau after roughly
#: 4-5k patches, about 2500 iterations at batch 2; wider networks need at least as many. This is an
#: estimate to revisit as training results come in, not something this module measures.
MIN_SAMPLES_3D = 2500 * 2
#: The same bar for 2D configurations, counted in slices: nnU-Net v2 gives a hippocampus-size dataset a
#: 2D batch of 287 slices for a 3D batch of 7 patches of 40 slices (the same voxels per step), i.e. one
#: 3D sample is worth about 40 2D samples.
MIN_SAMPLES_2D = MIN_SAMPLES_3D * 40
MIN_SAMPLES = {3: MIN_SAMPLES_3D, 2: MIN_SAMPLES_2D}
#: Share of the budget the fit itself may spend measuring (:func:`fit_seconds_limit`): at most 3 minutes of a
#: 30-minute budget (the hippocampus fit takes 18-47 s on 2 cores), 24 s of a 4-minute one. ``medseg train
#: --time-budget`` refitting a plan spends it out of the training budget.
FIT_FRACTION = 0.1
#: Seconds of building a model and its random batch, per measured setting, in the fit's time accounting.
SETUP_SECONDS = 0.3
#: Share of the time left after the probe that measuring the levers may take.
LEVER_SHARE = 0.5


def fit_seconds_limit(minutes: float) -> float:
    """Seconds the fit of a ``minutes`` budget may spend measuring: :data:`FIT_FRACTION` of the budget."""
    return FIT_FRACTION * float(minutes) * 60.0


def scaled_step_time(step_time: float, measured: Candidate, other: Candidate) -> float:
    """Predicted step time of ``other`` from the measured step time of ``measured``, erring on the slow side.

    Linear in patch voxels and batch; in width, quadratic upwards (convolution FLOPs grow with the square
    of the channels) and linear downwards (the cheaper per-channel operations shrink only linearly).
    """
    f = other.base_features / measured.base_features
    return (
        step_time
        * (f * f if f > 1 else f)
        * (other.patch_voxels / measured.patch_voxels)
        * (other.batch_size / measured.batch_size)
    )


def patch_coverage(patch_size: Sequence[int], median_shape: Sequence[float] | None) -> float:
    """Share of the median image one patch covers, ``min(1, prod(min(patch, median)) / prod(median))``.

    1.0 without a median shape. The convergence bar :data:`MIN_SAMPLES` was calibrated on patches that cover
    the whole image (hippocampus); ``samples x coverage`` ("whole-image samples") is recorded in the notes.
    """
    if not median_shape:
        return 1.0
    med = [max(1.0, float(m)) for m in median_shape]
    covered = math.prod(min(float(p), m) for p, m in zip(patch_size, med))
    return min(1.0, covered / math.prod(med))


@dataclass(frozen=True)
class Measured:
    """A candidate with its measured step time (``None`` when skipped or out of memory) and status.

    ``coverage`` is :func:`patch_coverage` of the candidate's patch on its configuration's median image.
    ``precision``/``channels_last`` are set when the candidate was measured at other levers than the fit's
    (its step crashed at those), ``spread`` holds the timed rounds' min/median/max.
    """

    candidate: Candidate
    step_time_s: float | None
    status: str = "measured"
    coverage: float = 1.0
    precision: str | None = None
    channels_last: bool | None = None
    spread: dict[str, Any] | None = None

    def iterations(self, budget_seconds: float) -> int:
        if self.step_time_s is None:
            return 0
        return int(math.floor(budget_seconds * USABLE_FRACTION / self.step_time_s))

    def samples(self, budget_seconds: float) -> int:
        return self.iterations(budget_seconds) * self.candidate.batch_size

    def image_samples(self, budget_seconds: float) -> int:
        """Samples in whole-image units, ``floor(samples x coverage)`` (recorded; the rule counts samples)."""
        return int(math.floor(self.samples(budget_seconds) * self.coverage))

    @property
    def samples_per_second(self) -> float:
        return 0.0 if self.step_time_s is None else self.candidate.batch_size / self.step_time_s


def choose_candidate(measured: Sequence[Measured], budget_seconds: float, dims: int) -> tuple[int, str]:
    """Apply the choice rule of the module docstring.

    Args:
        measured: candidates with their step times (``step_time_s`` None ones are never chosen).
        budget_seconds: training budget in seconds.
        dims: 2 or 3 (selects :data:`MIN_SAMPLES`).

    Returns:
        ``(index into measured, human-readable reasoning)``.

    Raises:
        PlanError: no candidate has a step time.
    """
    ok = [i for i, m in enumerate(measured) if m.step_time_s is not None]
    if not ok:
        raise PlanError("no budget candidate could be measured (all ran out of memory, crashed or were skipped)")
    need = MIN_SAMPLES[dims]
    usable = budget_seconds * USABLE_FRACTION
    head = (
        f"{budget_seconds / 60:g} min budget, {USABLE_FRACTION:.0%} = {usable:.0f} s of training steps; "
        f"a candidate converges when iterations x batch >= {need} samples. "
    )
    converging = [i for i in ok if measured[i].samples(budget_seconds) >= need]
    if converging:
        best = max(converging, key=lambda i: (measured[i].candidate.score, measured[i].samples(budget_seconds)))
        m = measured[best]
        rivals = [measured[i] for i in converging if i != best and measured[i].candidate.score == m.candidate.score]
        why = (
            f"{len(converging)} of {len(ok)} measured candidates converge; {m.candidate.label} has the largest "
            f"capacity x context (base features x patch voxels = {m.candidate.score})"
        )
        if rivals:
            why += f", and more samples ({m.samples(budget_seconds)}) than " + ", ".join(
                f"{r.candidate.label} ({r.samples(budget_seconds)})" for r in rivals
            )
        not_conv = [measured[i] for i in ok if i not in converging and measured[i].candidate.score > m.candidate.score]
        if not_conv:
            big = max(not_conv, key=lambda r: r.candidate.score)
            why += f"; the larger {big.candidate.label} would reach only {big.samples(budget_seconds)} samples"
    else:
        best = max(ok, key=lambda i: (measured[i].samples_per_second, measured[i].candidate.score))
        m = measured[best]
        why = (
            f"no candidate converges in the budget; {m.candidate.label} processes the most samples per second "
            f"({m.samples_per_second:.2f}/s, {m.samples(budget_seconds)} samples in the budget), so it gets "
            "closest to convergence"
        )
    why += (
        f": {m.step_time_s:.3f} s/step, {m.iterations(budget_seconds)} iterations, "
        f"{m.samples(budget_seconds)} samples (patch coverage {m.coverage:.2f})."
    )
    return best, head + why


def candidate_dict(c: Candidate) -> dict[str, Any]:
    return {
        "base_features": c.base_features,
        "max_features": c.max_features,
        "patch_size": list(c.patch_size),
        "batch_size": c.batch_size,
    }


def finite_or_none(t: float) -> float | None:
    return (round(float(t), 6) or 1e-6) if (t is not None and math.isfinite(t) and t > 0) else None
