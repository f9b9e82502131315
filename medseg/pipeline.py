"""High-level library API: one function per pipeline stage, as the CLI calls them.

``plan_and_preprocess`` (validate -> fingerprint -> plan -> preprocess), ``record_postprocessing_prior``
(after training: the connected-component rules a run's training labels support) and ``run_demo`` (the
whole pipeline on a generated synthetic dataset). Training, prediction, evaluation and find-best live in
their own packages and are called directly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from medseg.distributed import launch_rank
from medseg.errors import MedsegError
from medseg.fingerprint import extract_fingerprint
from medseg.io.dataset import load_dataset
from medseg.io.image import atomic_write_text
from medseg.io.validation import validate_dataset
from medseg.io.workdir import WorkDir
from medseg.planning import budget, budget_archs, resolution
from medseg.planning.plan import Plan
from medseg.planning.planner import PlannerOptions, plan_dataset
from medseg.postprocessing.prior import record_prior
from medseg.preprocessing import preprocess_dataset
from medseg.preprocessing.resolution import dataset_roundtrip_dice
from medseg.training.splits import read_splits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanResult:
    """What ``plan_and_preprocess`` produced."""

    plan: Plan
    plan_path: Path
    fingerprint_path: Path
    seconds: dict[str, float]


def _check_output_not_inside_input(data_dir: Path, work_dir: Path) -> None:
    data_dir, work_dir = data_dir.resolve(), work_dir.resolve()
    if work_dir == data_dir or data_dir in work_dir.parents:
        raise MedsegError(
            f"the work folder {work_dir} is inside the dataset folder {data_dir}; "
            "medseg never writes next to your input - choose a folder outside it"
        )


def plan_and_preprocess(
    data_dir: str | Path,
    work_dir: str | Path,
    options=None,
    configs: list[str] | None = None,
    num_workers: int = 1,
    preprocess: bool = True,
) -> PlanResult:
    """Validate a dataset, extract its fingerprint, plan it and preprocess it into ``work_dir``.

    Args:
        data_dir: dataset folder (MSD or nnU-Net v2 layout).
        work_dir: output folder (created; must not be inside ``data_dir``).
        options: :class:`medseg.planning.planner.PlannerOptions` (defaults when None).
        configs: configurations to preprocess (all planned when None).
        num_workers: parallel processes for validation, fingerprint and preprocessing.
        preprocess: when False only ``fingerprint.json`` and ``plans.json`` are written.

    Returns:
        PlanResult with the plan and the stage timings in seconds.

    Raises:
        DatasetError: listing every problem of the dataset; nothing is written in that case.
    """
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    _check_output_not_inside_input(data_dir, work_dir)
    options = options or PlannerOptions()
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    ds = load_dataset(data_dir)
    validate_dataset(ds, num_workers=num_workers)
    seconds["validate"] = time.perf_counter() - t
    logger.info(
        "dataset %s: %d cases, %d channel(s), labels %s", ds.name, len(ds.cases), ds.num_channels, list(ds.label_ids)
    )

    t = time.perf_counter()
    fp = extract_fingerprint(ds, num_workers=num_workers)
    seconds["fingerprint"] = time.perf_counter() - t

    t = time.perf_counter()
    plan = plan_dataset(ds, fp, options)
    seconds["plan"] = time.perf_counter() - t
    if options.time_budget_minutes is not None:
        t = time.perf_counter()
        plan = _fit_to_budget(plan, ds, fp, options)
        seconds["budget"] = time.perf_counter() - t

    work_dir.mkdir(parents=True, exist_ok=True)
    fp_path = WorkDir(work_dir).fingerprint
    fp.save(fp_path)
    plan_path = WorkDir(work_dir).plans
    plan.save(plan_path)
    logger.info("wrote %s", plan_path)

    if preprocess:
        t = time.perf_counter()
        preprocess_dataset(ds, plan, work_dir, configs=configs, num_workers=num_workers)
        seconds["preprocess"] = time.perf_counter() - t
        if options.time_budget_minutes is not None:  # the fit's share of the budget includes building the cache
            budget_note = {
                **plan.notes["budget"],
                "preprocess_seconds": round(seconds["preprocess"], 2),
                "fit_and_preprocess_seconds": round(seconds["budget"] + seconds["preprocess"], 2),
            }
            plan = dataclasses.replace(plan, notes={**plan.notes, "budget": budget_note})
            plan.save(plan_path)
    _write_dataset_reference(work_dir, ds)
    return PlanResult(plan=plan, plan_path=plan_path, fingerprint_path=fp_path, seconds=seconds)


#: Share of the budget fit's time limit the fit at the planned spacing may use; the rest is left for the
#: resolution lever (round-trip Dice, planning and measuring a coarser spacing) when it is needed.
PLANNED_SPACING_SHARE = 0.6


def _fit_to_budget(plan: Plan, ds, fp, options) -> Plan:
    """The time-budget fit: network, patch and batch at the planned spacing (of every planned architecture, the
    best one becoming the default: :mod:`medseg.planning.budget_archs`), then the resolution lever
    (:mod:`medseg.planning.resolution`, for that architecture), both within
    :func:`~medseg.planning.budget.fit_seconds_limit`."""
    t0 = time.perf_counter()
    limit = budget.fit_seconds_limit(options.time_budget_minutes)
    plan = budget_archs.fit_archs_to_budget(
        plan, options.device, options.time_budget_minutes, max_seconds=PLANNED_SPACING_SHARE * limit
    )
    arch = plan.configuration(plan.notes["budget"]["configuration"]).default_arch

    def plan_at(spacing: tuple[float, ...]):
        cfg = plan_dataset(ds, fp, dataclasses.replace(options, target_spacing=spacing)).configuration("3d_fullres")
        return dataclasses.replace(cfg, default_arch=arch)

    return resolution.fit_resolution(
        plan,
        options.device,
        options.time_budget_minutes,
        roundtrip=lambda spacings: dataset_roundtrip_dice(ds, spacings),
        plan_at=plan_at,
        max_seconds=max(0.0, limit - (time.perf_counter() - t0)),
    )


def _write_dataset_reference(work_dir: Path, ds) -> None:
    """Remember where the raw dataset lives (evaluation and postprocessing need the reference labels)."""
    info = {"root": str(Path(ds.root).resolve()), "cases": [c.case_id for c in ds.cases]}
    atomic_write_text(WorkDir(work_dir).dataset_ref, json.dumps(info, indent=1) + "\n")


def record_postprocessing_prior(work_dir: str | Path, run_dir: str | Path, fold: int | str) -> dict | None:
    """Record in a trained run the postprocessing its training cases' labels support.

    The rules (:func:`medseg.postprocessing.prior.prior_rules`, from the component statistics of
    ``WORK/fingerprint.json`` restricted to the fold's training cases) go to
    ``run_dir/postprocessing_prior.json``; ``medseg predict`` applies them when find-best fitted none for
    the ensemble. Only rank 0 of a distributed run writes.

    Args:
        work_dir: the work folder (``fingerprint.json``, ``plans.json``, ``splits.json``).
        run_dir: the run folder ``train`` returned.
        fold: the run's fold (``"all"``: every case).

    Returns:
        The rules, or None when not recorded (no fingerprint, not rank 0, or a problem, logged as a
        warning: the finished training does not fail).
    """
    if launch_rank() != 0:
        return None
    work_dir = Path(work_dir)
    try:  # the training has finished: a problem here must not fail it
        case_ids = None if fold == "all" else read_splits(WorkDir(work_dir).splits)[int(fold)]["train"]
        region_based = Plan.load(WorkDir(work_dir).plans).is_region_based
        return record_prior(work_dir, run_dir, case_ids, region_based=region_based)
    except (MedsegError, IndexError, OSError) as exc:
        logger.warning("no postprocessing recorded in %s: %s", run_dir, exc)
        return None
