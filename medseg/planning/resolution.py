"""Resolution as a lever of the time-budget fit: train at a coarser spacing when that buys samples.

When no candidate converges at the planned spacing (:func:`medseg.planning.budget.fit_plan_to_budget`:
fewer than :data:`~medseg.planning.budget.MIN_SAMPLES` samples in the budget), a coarser spacing is
weighed: its images are smaller, so its planned patch (and the candidates cut from it) can be cheaper
per step. What coarsening costs is accuracy lost to resolution, measured on the training labels: the
*round-trip Dice* (:mod:`medseg.preprocessing.resolution`, an upper bound of what training at that
spacing can reach).

**Rule** (:func:`choose_spacing`), applied only when the planned spacing's chosen candidate does not
converge (otherwise the plan is left as it is, e.g. hippocampus):

1. Options: the planned spacing and :data:`FACTORS` coarser ones (:func:`coarser_spacings`: the fine axes
   times 1.5 and 2, the coarse axis of anisotropic data kept). At most 2x, the range of nnU-Net's own
   ``3d_lowres`` step, since the round-trip Dice is a bound and not a prediction.
2. A coarser option is *admissible* when every foreground label keeps a mean round-trip Dice of at least
   :data:`MIN_ROUNDTRIP_DICE` (the worst label decides).
3. Each admissible option is planned at its spacing (topology, patch) and its best candidate predicted from
   the step times measured at the planned spacing (:func:`medseg.planning.budget.scaled_step_time`).
4. The finest option whose samples reach the bar wins; when none does, the one with the most. A coarser
   option must promise :data:`MIN_GAIN` x the planned spacing's samples (else resolution is kept).
5. The winner is then measured at its own spacing (:func:`fit_plan_to_budget` with the levers already
   chosen, within what is left of the fit's time limit) and kept only when the measurement confirms the
   gain; it becomes the ``3d_lowres`` configuration (its prediction is resampled to the scan like any
   configuration's), the plan's default.

Samples, not "whole-image samples": a variant that counted a sample as the share of the image its patch
covers (so that coarser spacings, whose patches cover the whole image, win) was measured on CHAOS T2
(15 training / 5 test cases, 30 minutes, 2 EPYC cores, ``docs/benchmarks.md``): 2.5 mm in-plane with
whole-image patches scored 0.742 mean Dice against 0.763 at the planned 1.25 mm with 28x96x96 patches,
lower in 4 of 5 cases. A step costs about the same per voxel at any spacing, so with samples as the unit
a coarser spacing wins only where its whole image is cheaper than the planned spacing's smallest patch.

Everything (options, round-trip Dice, predictions, the measured fit of the winner, why) goes into
``notes["budget"]["resolution"]``. Spacings are ``(Z, Y, X)`` in mm.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from medseg.planning.budget import (
    MIN_SAMPLES,
    Measured,
    choose_candidate,
    fit_plan_to_budget,
    patch_coverage,
    scaled_step_time,
)
from medseg.planning.candidates import Candidate, default_candidates
from medseg.planning.plan import ConfigurationPlan, Plan

logger = logging.getLogger(__name__)

#: Coarsening factors of the fine axes tried after the planned spacing.
FACTORS = (1.5, 2.0)
#: Every label's mean round-trip Dice at a coarser spacing must reach this for the spacing to be tried.
MIN_ROUNDTRIP_DICE = 0.97
#: A coarser spacing must promise this many times the planned spacing's samples.
MIN_GAIN = 1.25
#: Spacing ratio above which only the fine axes are coarsened (as the resampling's anisotropy rule).
ANISOTROPY_RATIO = 3.0
#: Name of the configuration a coarser spacing becomes.
COARSE_CONFIGURATION = "3d_lowres"

#: ``spacings -> [{label name: mean round-trip Dice}]`` (one dict per spacing).
RoundTripFn = Callable[[list[tuple[float, ...]]], list[dict[str, float]]]
#: ``spacing -> the 3d configuration planned at that spacing``.
PlanAtFn = Callable[[tuple[float, ...]], ConfigurationPlan]


def coarser_spacings(spacing: Sequence[float], factors: Sequence[float] = FACTORS) -> list[tuple[float, ...]]:
    """The planned ``spacing`` with its fine axes coarsened by each factor.

    Fine axes: those finer than ``max / ANISOTROPY_RATIO`` when the spacing is anisotropic, else every axis. A
    coarsened axis never exceeds the coarsest spacing.
    """
    sp = [float(s) for s in spacing]
    top = max(sp)
    fine = [s < top / ANISOTROPY_RATIO for s in sp] if top / min(sp) > ANISOTROPY_RATIO else [True] * len(sp)
    out: list[tuple[float, ...]] = []
    for f in factors:
        if all(fine):
            new = tuple(s * f for s in sp)
        else:
            new = tuple(min(top, s * f) if m else s for s, m in zip(sp, fine))
        if new != tuple(sp) and new not in out:
            out.append(new)
    return out


@dataclass(frozen=True)
class SpacingOption:
    """One spacing the resolution lever weighs."""

    spacing: tuple[float, ...]
    roundtrip_dice: dict[str, float]
    admissible: bool
    best: Measured | None = None
    configuration: ConfigurationPlan | None = None

    @property
    def worst_dice(self) -> float:
        return min(self.roundtrip_dice.values()) if self.roundtrip_dice else 1.0

    def samples(self, budget_s: float) -> int:
        return 0 if self.best is None else self.best.samples(budget_s)


def predict_best(cfg: ConfigurationPlan, reference: dict[Candidate, float], budget_s: float) -> Measured | None:
    """The candidate :func:`choose_candidate` would pick at ``cfg``'s spacing, step times predicted from
    ``reference`` (the nearest measured candidate by cost, :func:`scaled_step_time`)."""
    ref = [(c, t) for c, t in reference.items() if t is not None and math.isfinite(t) and t > 0]
    if not ref:
        return None
    median = tuple(cfg.median_shape[-cfg.dims :])
    out = []
    for c in default_candidates(cfg.network(), median):
        d, t = min(ref, key=lambda dt: abs(math.log(c.cost / dt[0].cost)))
        out.append(Measured(c, scaled_step_time(t, d, c), "predicted", patch_coverage(c.patch_size, median)))
    return out[choose_candidate(out, budget_s, cfg.dims)[0]]


def choose_spacing(options: Sequence[SpacingOption], budget_s: float, need: int) -> tuple[int, str]:
    """Apply steps 2-4 of the module's rule to ``options`` (the planned spacing first).

    Returns:
        ``(index of the chosen option, reasoning)``.
    """
    base = options[0]
    e0 = base.samples(budget_s)
    ok = [i for i, o in enumerate(options) if i == 0 or (o.admissible and o.best is not None)]
    reaching = [i for i in ok if options[i].samples(budget_s) >= need]
    pick = reaching[0] if reaching else max(ok, key=lambda i: (options[i].samples(budget_s), -i))
    o = options[pick]
    if pick != 0 and o.samples(budget_s) < MIN_GAIN * e0:
        return 0, (
            f"kept the planned spacing: the best coarser one ({_fmt(o.spacing)} mm) promises "
            f"{o.samples(budget_s)} samples, less than {MIN_GAIN}x the planned "
            f"spacing's {e0}"
        )
    if pick == 0:
        return 0, (f"kept the planned spacing: no admissible coarser spacing promises more than its {e0} samples")
    return pick, (
        f"{_fmt(o.spacing)} mm: {o.samples(budget_s)} samples "
        f"({'reaches' if pick in reaching else 'closest to'} the {need} bar) against {e0} at the planned "
        f"{_fmt(base.spacing)} mm; worst round-trip Dice {o.worst_dice:.3f} >= {MIN_ROUNDTRIP_DICE}"
    )


def fit_resolution(
    plan: Plan,
    device: str,
    minutes: float,
    *,
    roundtrip: RoundTripFn,
    plan_at: PlanAtFn,
    max_seconds: float | None = None,
    **fit_kwargs: Any,
) -> Plan:
    """Apply the resolution lever to a plan fitted by :func:`fit_plan_to_budget` (see the module docstring).

    Args:
        plan: the fitted plan (``notes["budget"]`` of its default configuration).
        device, minutes: as for the fit.
        roundtrip: mean round-trip Dice per label at each spacing (training labels).
        plan_at: the 3D configuration planned at a spacing.
        max_seconds: what is left of the fit's time limit (None: no limit).
        fit_kwargs: passed on to :func:`fit_plan_to_budget` (``measure_fn``, ``measure_steps``, ``seed``).

    Returns:
        ``plan`` with ``notes["budget"]["resolution"]`` recording the decision, or a new plan whose default
        configuration is :data:`COARSE_CONFIGURATION` at the chosen spacing.
    """
    t0 = time.perf_counter()
    notes = dict(plan.notes.get("budget") or {})
    cfg = plan.configuration(notes.get("configuration") or plan.default_configuration)
    budget_s, need = float(minutes) * 60.0, MIN_SAMPLES[cfg.dims]
    chosen = notes.get("chosen") or {}
    record: dict[str, Any] = {
        "rule": (
            f"only when the planned spacing does not converge: fine axes x {list(FACTORS)}; "
            f"admissible when every label's mean round-trip Dice >= {MIN_ROUNDTRIP_DICE}; "
            "the finest reaching the whole-image sample bar, else the most; a coarser "
            f"spacing must promise >= {MIN_GAIN}x the planned one's, and its measured "
            "fit must confirm it"
        )
    }
    if cfg.dims != 3 or chosen.get("converges") or cfg.previous_stage is not None:
        record["decision"] = (
            "kept the planned spacing: its chosen candidate converges"
            if chosen.get("converges")
            else "kept the planned spacing: only a 3D configuration's spacing is a lever"
        )
        return _with_record(plan, record)
    levers = (str(chosen.get("precision")), bool(chosen.get("channels_last")))
    reference = {
        Candidate(r["base_features"], r["max_features"], tuple(r["patch_size"]), r["batch_size"]): float(
            r["step_time_s"]
        )
        for r in notes.get("candidates", [])
        if r.get("step_time_s")
    }
    base_best = Measured(
        Candidate(chosen["base_features"], chosen["max_features"], tuple(chosen["patch_size"]), chosen["batch_size"]),
        chosen.get("step_time_s"),
        "measured",
        chosen.get("patch_coverage", 1.0),
    )
    spacings = coarser_spacings(cfg.spacing)
    dice = roundtrip([tuple(cfg.spacing), *spacings])
    options = [SpacingOption(tuple(cfg.spacing), dice[0], True, base_best, cfg)]
    for sp, d in zip(spacings, dice[1:]):
        admissible = bool(d) and min(d.values()) >= MIN_ROUNDTRIP_DICE
        coarse = plan_at(sp) if admissible else None
        best = predict_best(coarse, reference, budget_s) if coarse is not None else None
        options.append(SpacingOption(sp, d, admissible, best, coarse))
    pick, why = choose_spacing(options, budget_s, need)
    record["options"] = [_option_dict(o, budget_s, need) for o in options]
    record["predict_seconds"] = round(time.perf_counter() - t0, 2)
    if pick == 0:
        record["decision"] = why
        logger.info("resolution lever: %s", why)
        return _with_record(plan, record)
    o = options[pick]
    assert o.configuration is not None
    coarse_cfg = replace(o.configuration, name=COARSE_CONFIGURATION, previous_stage=None)
    trial = replace(plan, configurations={**plan.configurations, COARSE_CONFIGURATION: coarse_cfg})
    left = None if max_seconds is None else max(0.0, max_seconds - (time.perf_counter() - t0))
    fitted = fit_plan_to_budget(
        trial,
        device,
        minutes,
        configuration=COARSE_CONFIGURATION,
        max_seconds=left,
        levers=levers,
        reference_times=reference,
        **fit_kwargs,
    )
    got = fitted.notes["budget"]["chosen"]
    record["measured_at_chosen"] = {
        k: got.get(k)
        for k in ("base_features", "patch_size", "batch_size", "step_time_s", "iterations", "samples", "image_samples")
    }
    if (got.get("samples") or 0) < MIN_GAIN * options[0].samples(budget_s):
        record["decision"] = (
            f"kept the planned spacing: measured at {_fmt(o.spacing)} mm the best candidate gets "
            f"{got.get('samples')} samples, not {MIN_GAIN}x the planned "
            f"spacing's {options[0].samples(budget_s)} (predicted: {o.samples(budget_s)})"
        )
        logger.info("resolution lever: %s", record["decision"])
        return _with_record(plan, record)
    record["decision"] = f"trains {COARSE_CONFIGURATION} at " + why
    record["planned_spacing_fit"] = {
        k: notes.get(k) for k in ("configuration", "levers", "candidates", "chosen", "reasoning", "measure_seconds")
    }
    logger.info("resolution lever: %s", record["decision"])
    out_notes = {**fitted.notes["budget"], "resolution": record}
    return replace(fitted, notes={**fitted.notes, "budget": out_notes}).validate()


def _with_record(plan: Plan, record: dict[str, Any]) -> Plan:
    budget = {**(plan.notes.get("budget") or {}), "resolution": record}
    return replace(plan, notes={**plan.notes, "budget": budget})


def _option_dict(o: SpacingOption, budget_s: float, need: int) -> dict[str, Any]:
    d: dict[str, Any] = {
        "spacing": [round(s, 4) for s in o.spacing],
        "roundtrip_dice": o.roundtrip_dice,
        "admissible": o.admissible,
    }
    if o.configuration is not None:
        d["median_shape"] = list(o.configuration.median_shape)
    if o.best is not None:
        c = o.best.candidate
        d["best"] = {
            "label": c.label,
            "step_time_s": None if o.best.step_time_s is None else round(o.best.step_time_s, 4),
            "status": o.best.status,
            "patch_coverage": round(o.best.coverage, 4),
            "samples": o.samples(budget_s),
            "image_samples": o.best.image_samples(budget_s),
            "converges": o.samples(budget_s) >= need,
        }
    return d


def _fmt(spacing: Sequence[float]) -> str:
    return "x".join(f"{s:g}" for s in (round(v, 3) for v in spacing))


__all__ = [
    "COARSE_CONFIGURATION",
    "FACTORS",
    "MIN_GAIN",
    "MIN_ROUNDTRIP_DICE",
    "SpacingOption",
    "choose_spacing",
    "coarser_spacings",
    "fit_resolution",
    "predict_best",
]
