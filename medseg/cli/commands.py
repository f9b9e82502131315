"""Subcommand implementations: turn parsed arguments into dataclasses and call one library function."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import ConfigError
from medseg.options import OutputFormat, Switch

if TYPE_CHECKING:
    from medseg.distributed import DistContext
    from medseg.inference.case_output import CaseHook, FinishedCase
    from medseg.inference.dicom_output import DicomOutputWriter, SourceFiles
    from medseg.inference.predictor import Predictor
    from medseg.inference.shards import Shard
    from medseg.postprocessing import InstanceWriter

logger = logging.getLogger("medseg")

#: How long ranks that finished their cases wait at the barrier for the slowest (then they leave the part files).
PREDICT_BARRIER_TIMEOUT = datetime.timedelta(hours=24)


def default_num_workers() -> int:
    """CPU count available to this process (the CLI is the only place reading the environment)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available; use --device cpu")
    return device


def cmd_plan(args: argparse.Namespace) -> int:
    from medseg.inference.sliding_window import tta_variants
    from medseg.pipeline import plan_and_preprocess
    from medseg.planning.planner import PlannerOptions

    device = _resolve_device(args.device)
    options = PlannerOptions(
        gpu_memory_gb=args.gpu_memory_gb,
        archs=tuple(args.archs),
        device=device,
        time_budget_minutes=args.time_budget,
    )
    workers = args.num_workers or default_num_workers()
    result = plan_and_preprocess(
        args.data, args.output, options, configs=args.configs, num_workers=workers, preprocess=not args.no_preprocess
    )
    plan = result.plan
    print(f"plan written to {result.plan_path}")
    for name, cfg in plan.configurations.items():
        for arch, net in cfg.networks.items():
            mem = f", ~{net.estimated_memory_gb:.2f} GB" if net.estimated_memory_gb is not None else ""
            axes, shifts = tta_variants(cfg.resolved_mirror_axes(), net.total_stride())
            print(
                f"  {name:11s} {arch:8s} spacing {[round(s, 3) for s in cfg.spacing]} patch {list(net.patch_size)} "
                f"batch {net.batch_size} stages {net.spec.num_stages}{mem}, mirror axes {list(axes)}, "
                f"TTA {2 ** len(axes)} flip(s) x {len(shifts)} shift(s)"
            )
    print("  " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from medseg.pipeline import record_postprocessing_prior
    from medseg.training import AugmentationConfig, TrainConfig, train

    overrides = {
        "configuration": args.config,
        "arch": args.arch,
        "epochs": args.epochs,
        "iters_per_epoch": args.iters_per_epoch,
        "time_budget_minutes": args.time_budget,
        "device": _resolve_device(args.device),
        "num_workers": args.num_workers,
        "precision": args.precision,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "seed": args.seed,
        "pretrained": args.pretrained,
        "weight_averaging": args.weight_averaging,
    }
    fold = args.fold
    if fold != "all":
        try:
            fold = int(fold)
        except ValueError:
            raise ConfigError(f"--fold must be an integer 0-4 or 'all', got {args.fold!r}") from None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: v for k, v in overrides.items() if v is not None and k in names}
    kwargs["fold"] = fold
    if args.keep_plan:
        kwargs["keep_plan"] = True
    if args.no_validation and "final_validation" in names:
        kwargs["final_validation"] = False
    if args.intensity_augmentation != Switch.AUTO:
        kwargs["augmentation"] = AugmentationConfig(intensity=args.intensity_augmentation == Switch.ON)
    run_dir = train(Path(args.work), TrainConfig(**kwargs), resume=args.resume)
    record_postprocessing_prior(Path(args.work), run_dir, fold)
    print(f"training finished: {run_dir}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    shard, ranks = _predict_shard(args)
    try:
        return _predict(args, shard, ranks)
    finally:
        ranks.shutdown()


def _predict_shard(args: argparse.Namespace) -> tuple[Shard | None, DistContext]:
    """This process's share of the cases: ``--part K/N``, or its rank under ``torchrun`` (a gloo group, for
    the barrier before rank 0 merges the folder files); None for a plain run.

    Raises:
        ConfigError: a malformed ``--part``, or ``--part`` under ``torchrun``.
    """
    from medseg.distributed import DistContext, init_distributed, launch_world_size
    from medseg.inference.shards import Shard

    if args.part is not None:
        if launch_world_size() > 1:
            raise ConfigError("--part splits the cases among separate commands; under torchrun the ranks split them")
        shard = Shard.parse(args.part)
        return (shard if shard.count > 1 else None), DistContext()
    if launch_world_size() <= 1:
        return None, DistContext()
    ranks = init_distributed("cpu", backend="gloo", timeout=PREDICT_BARRIER_TIMEOUT)
    return Shard(ranks.rank, ranks.world_size), ranks


def _predict(args: argparse.Namespace, shard: Shard | None, ranks: DistContext) -> int:
    import torch

    from medseg.ensembling import bundle_predictor, work_dir_predictor
    from medseg.inference import predict_folder
    from medseg.inference.prediction_record import RECORD_NAME, merge_record_parts

    device = _resolve_device(args.device)
    if ranks.enabled and device == "cuda":  # one GPU per rank on its machine
        device = f"cuda:{ranks.local_rank % torch.cuda.device_count()}"
    instances = _instance_writer(args, shard)
    sources = _dicom_sources(args)
    folds = None
    if args.folds is not None:
        folds = [f if f == "all" else int(f) for f in args.folds]
    bundle = Path(args.model).is_file()  # a model bundle from `medseg export`: its weights were chosen at export
    predictor = (bundle_predictor if bundle else work_dir_predictor)(
        Path(args.model),
        configs=args.config,
        archs=args.arch,
        folds=folds,
        **({} if bundle else {"checkpoint": args.checkpoint}),
        device=device,
        use_tta=not args.no_tta,
        step=args.step,
        postprocessing=not args.no_postprocessing,
    )
    dicom = _dicom_writer(args, sources, predictor)
    result = predict_folder(
        Path(args.input),
        Path(args.output),
        predictor,
        overwrite=args.overwrite,
        save_probabilities=args.save_probabilities,
        num_workers=args.num_workers or 1,
        time_budget_per_case=args.time_budget_per_case,
        case_hook=_all_hooks(instances, dicom),
        shard=shard,
    )
    print(result.summary())
    if dicom is not None:
        print(f"{args.output_format} of {len(dicom.written)} case(s) written to {args.output}")
        if dicom.empty:
            print(f"  {len(dicom.empty)} case(s) without foreground have none: {', '.join(sorted(dicom.empty))}")
    if ranks.enabled:
        try:
            ranks.barrier()
        except RuntimeError as exc:  # a rank died or the slowest took too long: a plain run merges later
            logger.warning("the ranks did not all finish (%s); the folder's part files are left to merge", exc)
        else:
            if ranks.is_main:
                merged = merge_record_parts(Path(args.output) / RECORD_NAME)
                merged = (instances is not None and instances.merge_parts()) or merged
                if merged:
                    print(f"merged the folder records of {ranks.world_size} ranks in {args.output}")
    if instances is not None:
        print(f"instances of {len(instances.written)} case(s) written to {instances.path}")
        stale = [c for c in result.skipped if c not in instances.cases]
        if stale:
            print(f"  {len(stale)} skipped case(s) have no instances (predict them again with --overwrite)")
    return 0 if result.ok else 1


def _dicom_sources(args: argparse.Namespace) -> SourceFiles | None:
    """Case id -> the DICOM series files of ``predict -i`` (None for NIfTI output).

    Raises:
        ConfigError: a DICOM output format, but the input is no DICOM series (predict reads NIfTI images only
            until DICOM input is connected here).
    """
    if args.output_format == OutputFormat.NIFTI:
        return None
    raise ConfigError(
        f"--output-format {args.output_format} needs DICOM input series; {args.input} holds none that predict reads"
    )


def _dicom_writer(
    args: argparse.Namespace, sources: SourceFiles | None, predictor: Predictor
) -> DicomOutputWriter | None:
    """The DICOM SEG / RTSTRUCT writer of ``predict --output-format`` (None for NIfTI output)."""
    from medseg.inference.dicom_output import DicomOutputWriter

    if sources is None:
        return None
    plan = predictor.plan
    model_id = f"{plan.dataset_name} {predictor.describe()} ({Path(args.model).name})"
    return DicomOutputWriter(args.output_format, sources, dict(zip(plan.label_ids, plan.label_names)), model_id)


def _all_hooks(*hooks: CaseHook | None) -> CaseHook | None:
    """One case hook calling each of ``hooks`` that is not None, in order (None when none is)."""
    given = [h for h in hooks if h is not None]
    if len(given) <= 1:
        return given[0] if given else None

    def call_all(case: FinishedCase) -> None:
        for hook in given:
            hook(case)

    return call_all


def _instance_writer(args: argparse.Namespace, shard: Shard | None) -> InstanceWriter | None:
    """The instance writer of ``predict --instances`` (None without it); a shard writes its part of the table.

    Raises:
        ConfigError: instance options without ``--instances``, or ``--min-separation-mm`` without
            ``--split-touching``.
    """
    from medseg.postprocessing import InstanceOptions, InstanceWriter

    given = [
        flag
        for flag, value in (
            ("--instance-connectivity", args.instance_connectivity),
            ("--split-touching", args.split_touching or None),
            ("--min-separation-mm", args.min_separation_mm),
        )
        if value is not None
    ]
    if not args.instances:
        if given:
            raise ConfigError(f"{given[0]} needs --instances")
        return None
    if args.min_separation_mm is not None and not args.split_touching:
        raise ConfigError("--min-separation-mm needs --split-touching")
    options = InstanceOptions(
        connectivity=args.instance_connectivity or 3,
        split_touching=args.split_touching,
        **({} if args.min_separation_mm is None else {"min_separation_mm": args.min_separation_mm}),
    )
    return InstanceWriter(Path(args.output), options, shard)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medseg.evaluation import LesionWiseOptions, evaluate_folders

    out = Path(args.output) if args.output else Path(args.pred) / "metrics.json"
    if args.min_lesion_volume < 0:
        raise ConfigError(f"--min-lesion-volume must be >= 0 mL, got {args.min_lesion_volume}")
    lesion_wise = (
        LesionWiseOptions(matching=args.lesion_matching, min_volume_ml=args.min_lesion_volume)
        if args.lesion_wise
        else None
    )
    report = evaluate_folders(
        Path(args.pred),
        Path(args.ref),
        label_ids=args.labels,
        output=out,
        num_workers=args.num_workers or default_num_workers(),
        ignore_label=args.ignore_label,
        lesion_wise=lesion_wise,
    )
    print(report.summary())
    print(f"metrics written to {out} and {out.with_suffix('.csv')}")
    return 0


def cmd_find_best(args: argparse.Namespace) -> int:
    from medseg.ensembling import find_best

    best = find_best(Path(args.work), metric=args.metric)
    print(best.summary())
    print("predict with:\n  " + best.predict_command)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from medseg.demo import DemoOptions, run_demo

    result = run_demo(
        DemoOptions(
            output_dir=Path(args.output),
            minutes=args.minutes,
            num_cases=args.num_cases,
            device=_resolve_device(args.device),
        )
    )
    print(result.summary())
    return 0
