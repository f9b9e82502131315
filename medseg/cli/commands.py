"""Subcommand implementations: turn parsed arguments into dataclasses and call one library function."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import ConfigError
from medseg.options import Switch

if TYPE_CHECKING:
    from medseg.postprocessing import InstanceWriter

logger = logging.getLogger("medseg")


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
    from medseg.ensembling import bundle_predictor, work_dir_predictor
    from medseg.inference import predict_folder

    instances = _instance_writer(args)
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
        device=_resolve_device(args.device),
        use_tta=not args.no_tta,
        step=args.step,
        postprocessing=not args.no_postprocessing,
        max_ram_gb=args.max_ram,
    )
    result = predict_folder(
        Path(args.input),
        Path(args.output),
        predictor,
        overwrite=args.overwrite,
        save_probabilities=args.save_probabilities,
        num_workers=args.num_workers or 1,
        time_budget_per_case=args.time_budget_per_case,
        case_hook=instances,
    )
    print(result.summary())
    if instances is not None:
        print(f"instances of {len(instances.written)} case(s) written to {instances.path}")
        stale = [c for c in result.skipped if c not in instances.cases]
        if stale:
            print(f"  {len(stale)} skipped case(s) have no instances (predict them again with --overwrite)")
    return 0 if result.ok else 1


def _instance_writer(args: argparse.Namespace) -> InstanceWriter | None:
    """The instance writer of ``predict --instances`` (None without it).

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
    return InstanceWriter(Path(args.output), options)


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
