"""``train(work_dir, cfg)``: the library entry point of ``medseg train``; and loading trained runs.

Run folder ``WORK/runs/<configuration>/<arch>/fold_<k>/`` (``fold_all`` for ``--fold all``) with
``config.json`` (the settings), ``run_record.json`` (what the run did: :class:`~medseg.training.run_record.RunRecord`),
``plans.json``, ``checkpoint_{latest,best,final}.pt``, ``training_log.txt``,
``training_curves.png``, ``progress.json`` and ``validation/``; ``.lock`` while a process trains it
(:mod:`medseg.training.lock`: a second ``medseg train`` of the same run is refused).

Resuming (``resume=True``) continues from ``checkpoint_latest.pt`` with the stored configuration; only
``epochs``, ``time_budget_minutes`` (both totals for the whole run: larger values extend a finished
run), ``device``, ``num_workers``, ``num_threads`` and the final-validation switches may change.

A time budget covers the whole command: a fresh run whose plan is not fitted to the budget and device
is refitted first (:mod:`medseg.training.budget_refit`, unless ``keep_plan`` or ``pretrained``), and the
final validation gets the time left (:class:`~medseg.training.validation_budget.ValidationBudget`).

A fresh run with ``pretrained`` starts from the matching tensors of those weights
(:mod:`medseg.training.pretrained`); what was loaded is in ``run_record.json`` (``pretrained_report``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from medseg.distributed import init_distributed, launch_rank
from medseg.errors import CheckpointError, ConfigError, MedsegError, PlanError
from medseg.inference.members import load_member
from medseg.io.checkpoint import load_checkpoint
from medseg.io.image import atomic_write_text
from medseg.io.json_files import load_json_file
from medseg.io.workdir import RunDir, WorkDir
from medseg.planning.plan import Plan
from medseg.planning.stage import Stage
from medseg.preprocessing import list_preprocessed_cases, load_case_properties
from medseg.training.budget_refit import fit_run_to_budget
from medseg.training.config import TrainConfig
from medseg.training.distributed import unwrap
from medseg.training.intensity_rule import decide_intensity_augmentation
from medseg.training.lock import RunLock
from medseg.training.pretrained import load_pretrained, prepare_pretrained
from medseg.training.previous_stage import prepare_previous_stage
from medseg.training.run_record import RunRecord
from medseg.training.run_stage import run_plan
from medseg.training.splits import fold_cases
from medseg.training.trainer import Trainer
from medseg.training.validation import validate_run

logger = logging.getLogger(__name__)

#: Fields a resumed run may change; everything else comes from the run's stored configuration.
RESUMABLE_FIELDS = (
    "epochs",
    "time_budget_minutes",
    "device",
    "num_workers",
    "num_threads",
    "final_validation",
    "validation_tta",
    "save_probabilities",
)


def run_dir_for(work_dir: str | Path, configuration: str, arch: str, fold: int | str) -> Path:
    """``WORK/runs/<configuration>/<arch>/fold_<k>``."""
    return WorkDir(work_dir).run(configuration, arch, fold).path


def read_run_record(run_dir: str | Path) -> RunRecord:
    """The run record of a run folder: ``run_record.json``, or for a run written before it existed, the
    record's keys in its ``config.json`` (an empty record when neither holds one).

    Raises:
        ConfigError: the file is unreadable or malformed.
    """
    run = RunDir(run_dir)
    path = run.run_record
    if path.is_file():
        return RunRecord.load(path)
    config = run.config
    if not config.is_file():
        return RunRecord()
    return load_json_file(config, RunRecord.from_config_dict, "training configuration", ConfigError)


def _merge_for_resume(stored: TrainConfig, given: TrainConfig) -> TrainConfig:
    """The stored configuration with the resumable fields of ``given`` where they were set."""
    defaults = TrainConfig()
    changes: dict[str, Any] = {}
    for name in RESUMABLE_FIELDS:
        value = getattr(given, name)
        if value != getattr(defaults, name) and value != getattr(stored, name):
            changes[name] = value
    ignored = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RESUMABLE_FIELDS
        and f.name not in ("configuration", "arch", "fold")
        and getattr(given, f.name) != getattr(defaults, f.name)
        and getattr(given, f.name) != getattr(stored, f.name)
    ]
    if ignored:
        logger.warning(
            "resuming with the run's stored settings; ignoring changed %s (start a new run to change them)",
            ", ".join(ignored),
        )
    if stored.time_budget_minutes is not None and "time_budget_minutes" not in changes and "epochs" in changes:
        changes["time_budget_minutes"] = None  # an explicit epoch count turns a budgeted run into an epoch run
    return dataclasses.replace(stored, **changes)


class _RunLogFile:
    """Attach ``training_log.txt`` to the ``medseg`` logger for the duration of a run (rank 0 only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.handler: logging.Handler | None = None
        self.logger = logging.getLogger("medseg")
        self.old_level = self.logger.level

    def __enter__(self) -> _RunLogFile:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self.handler.setLevel(logging.INFO)
            self.logger.addHandler(self.handler)
            if self.logger.getEffectiveLevel() > logging.INFO:
                self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
            self.handler.close()
            self.logger.setLevel(self.old_level)


def train(work_dir: str | Path, cfg: TrainConfig, resume: bool = False) -> Path:
    """Train one network on one fold; see the module docstring for the run folder.

    Args:
        work_dir: the work folder written by ``medseg plan`` (``plans.json``, ``preprocessed/``).
        cfg: training settings; ``configuration``/``arch`` None select the plan's defaults; without
            ``epochs`` and ``time_budget_minutes`` a plan made for a time budget trains for that budget.
        resume: continue the run from its ``checkpoint_latest.pt`` (a fresh run when there is none).

    Returns:
        The run folder.

    Raises:
        PlanError: no or invalid ``plans.json``; unknown configuration or architecture.
        ConfigError: invalid settings, too few cases for the folds, an existing run without ``resume``,
            another process training the same run folder.
        CheckpointError: ``checkpoint_latest.pt`` is corrupt, truncated or from another model.
        MedsegError: missing or stale preprocessed data.
    """
    work_dir = Path(work_dir)
    plan_path = WorkDir(work_dir).plans
    if not plan_path.is_file():
        raise PlanError(f"{plan_path}: no plan found; run `medseg plan DATA -o {work_dir}` first")
    plan = Plan.load(plan_path)
    cfg.validate()
    stage = Stage.resolve(plan, cfg.configuration, cfg.arch)  # clear error when not planned
    run_dir = run_dir_for(work_dir, stage.config_name, stage.arch, cfg.fold)
    if cfg.distill is not None and run_dir.resolve() in {Path(t).resolve() for t in cfg.distill.teachers}:
        raise ConfigError(f"{run_dir}: a run cannot be its own teacher; train the student in another work folder")
    with RunLock(run_dir, enabled=launch_rank() == 0):  # a second `medseg train` of this run is refused
        return _train_locked(work_dir, stage, cfg, run_dir, resume)


def _train_locked(work_dir: Path, stage: Stage, cfg: TrainConfig, run_dir: Path, resume: bool) -> Path:
    """:func:`train` once this process holds the run folder's lock (:mod:`medseg.training.lock`)."""
    configuration, arch = stage.config_name, stage.arch
    started = time.perf_counter()  # a time budget counts from here, a refit of the plan included

    run = RunDir(run_dir)
    latest = run.checkpoint("latest")
    checkpoint = None
    record = RunRecord()
    if resume and latest.is_file():
        checkpoint = load_checkpoint(latest)
        if checkpoint["configuration"] != configuration or checkpoint["arch"] != arch:
            raise CheckpointError(
                f"{latest}: belongs to {checkpoint['configuration']}/{checkpoint['arch']}, not {configuration}/{arch}"
            )
        try:
            stored = TrainConfig.from_dict(checkpoint["train_config"], where=f"{latest} (train_config)")
            stage = stage.with_plan(Plan.from_dict(checkpoint["plan"]))
        except (ConfigError, PlanError) as exc:
            raise CheckpointError(f"{latest}: unreadable stored settings: {exc}") from None
        cfg = _merge_for_resume(stored, cfg)
        record = read_run_record(run_dir)
    else:
        if resume:
            logger.info("%s: nothing to resume, starting a new run", run_dir)
        elif latest.exists() or run.checkpoint("final").exists():
            raise ConfigError(
                f"{run_dir}: already holds a training run; continue it with --resume, or delete the folder to start over"
            )
        budget = stage.plan.time_budget_minutes
        if cfg.epochs is None and cfg.time_budget_minutes is None and budget is not None:
            cfg = dataclasses.replace(cfg, time_budget_minutes=float(budget))
            logger.info("the plan was made for a %.0f-minute budget; training for that budget", budget)
    # concrete optimizer, lr and momentum (time-budgeted runs get the short-schedule ones), stored in config.json
    intensity_requested = cfg.augmentation.intensity
    cfg = dataclasses.replace(cfg, configuration=configuration, arch=arch).resolved().validate()
    pretrained = None
    if checkpoint is None and cfg.pretrained is not None:  # read and checked before any data is loaded
        pretrained = prepare_pretrained(cfg.pretrained, run_plan(stage, cfg))

    dist_ctx = init_distributed(cfg.device)
    try:
        case_ids = list_preprocessed_cases(work_dir, stage.plan, configuration)
        if not case_ids:
            raise MedsegError(
                f"{WorkDir(work_dir).preprocessed_root}: no preprocessed cases for configuration {configuration!r}; "
                f"run `medseg plan` (with preprocessing) first"
            )
        # every rank derives the same folds; only rank 0 writes a new splits.json
        train_ids, val_ids = fold_cases(work_dir, case_ids, cfg.fold, write=dist_ctx.is_main)
        if stage.previous_stage is not None:  # refused until the folds exist
            prepare_previous_stage(work_dir, stage, sorted({*train_ids, *val_ids}))
        if dist_ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run.training_log if dist_ctx.is_main else None
        with _RunLogFile(log_path):
            if checkpoint is None and cfg.short_schedule and intensity_requested is None:
                cfg, record = _decide_intensity(work_dir, stage, cfg, record, train_ids)
            if checkpoint is None and cfg.time_budget_minutes is not None:
                stage, budget_fit = fit_run_to_budget(stage, cfg, distributed=dist_ctx.enabled)
                record = dataclasses.replace(record, budget_fit=budget_fit)
            trainer = Trainer(
                work_dir,
                stage,
                cfg,
                run_dir,
                dist_ctx,
                train_ids,
                val_ids,
                checkpoint,
                started=started,
                run_record=record,
            )
            cfg = trainer.cfg  # with the trainer's fp32 fallback (trainer.run_record: the precision_check)
            if pretrained is not None:
                report = load_pretrained(unwrap(trainer.model), pretrained, trainer.stage)
                trainer.run_record = dataclasses.replace(trainer.run_record, pretrained_report=report)
                pretrained = None  # the copied weights are the model's now
            elif checkpoint is not None and cfg.pretrained is not None:
                logger.info(
                    "resuming from %s: the pretrained weights (%s) were loaded when the run started and "
                    "are not loaded again",
                    latest.name,
                    cfg.pretrained,
                )
            if dist_ctx.is_main:
                atomic_write_text(run.config, cfg.to_json())
                atomic_write_text(run.run_record, trainer.run_record.to_json())
                trainer.plan.save(run.plans)
            trained = trainer.fit()
            if trained or not run.checkpoint("final").is_file():
                trainer.save("latest", finished=True)  # raw weights (and the average) to resume from
                trainer.use_averaged_weights()
                trainer.save("final", finished=True)
            else:
                trainer.use_averaged_weights()  # the final validation scores what checkpoint_final holds
            dist_ctx.barrier()
            if dist_ctx.is_main:
                _final_validation(trainer)
    finally:
        dist_ctx.shutdown()
    return run_dir


def _decide_intensity(
    work_dir: Path, stage: Stage, cfg: TrainConfig, record: RunRecord, train_ids: list[str]
) -> tuple[TrainConfig, RunRecord]:
    """A time-budgeted run's intensity augmentation from its training cases (recorded in the run record)."""
    props = [load_case_properties(work_dir, stage.plan, stage.config_name, case_id) for case_id in train_ids]
    decision = decide_intensity_augmentation(props)
    logger.info("intensity augmentation %s", decision["reason"])
    augmentation = dataclasses.replace(cfg.augmentation, intensity=bool(decision["intensity"]))
    return dataclasses.replace(cfg, augmentation=augmentation), dataclasses.replace(
        record, intensity_augmentation=decision
    )


def _final_validation(trainer: Trainer) -> None:
    cfg = trainer.cfg
    if not cfg.final_validation:
        return
    if not trainer.val_ids:
        logger.info("no held-out cases (fold %s): skipping the final validation", cfg.fold)
        return
    metrics = RunDir(trainer.run_dir).validation_metrics
    if metrics.is_file():
        try:
            done = json.loads(metrics.read_text()).get("iteration") == trainer.iteration
        except (OSError, ValueError):
            done = False
        if done:
            logger.info("%s is up to date", metrics)
            return
    trainer.write_progress("validating")
    validate_run(
        unwrap(trainer.model),
        trainer.stage,
        trainer.work_dir,
        trainer.run_dir,
        trainer.val_ids,
        device=trainer.device,
        precision=trainer.precision,
        channels_last=trainer.channels_last,
        use_tta=cfg.validation_tta,
        save_probabilities=cfg.save_probabilities,
        extra={"iteration": trainer.iteration, "epoch": trainer.epoch, "fold": cfg.fold},
        budget=trainer.validation_budget(),
    )
    trainer.write_progress("finished")


def load_model_from_run(
    run_dir: str | Path, checkpoint: str = "final", device: str = "cpu"
) -> tuple[torch.nn.Module, Plan, str, str]:
    """Rebuild a trained network from its run folder alone.

    Args:
        run_dir: ``WORK/runs/<config>/<arch>/fold_<k>``.
        checkpoint: ``final``, ``best`` or ``latest``.
        device: where to put the model.

    Returns:
        ``(model in eval mode, plan, configuration name, arch)``.

    Raises:
        CheckpointError: missing, corrupt or foreign checkpoint, or weights that do not fit the plan.
    """
    member = load_member(run_dir, checkpoint)
    return member.model.to(device).eval(), member.plan, member.configuration, member.arch
