"""Subcommand implementations: turn parsed arguments into dataclasses and call one library function."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

from medseg.errors import ConfigError
from medseg.options import LRSchedule, Switch

logger = logging.getLogger("medseg")


def default_num_workers() -> int:
    """CPU count available to this process (the CLI is the only place reading the environment)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str | None) -> str:
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

    device = resolve_device(args.device)
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
    from medseg.training.distill_config import DistillConfig

    overrides = {
        "configuration": args.config,
        "arch": args.arch,
        "epochs": args.epochs,
        "iters_per_epoch": args.iters_per_epoch,
        "time_budget_minutes": args.time_budget,
        "device": resolve_device(args.device),
        "num_workers": args.num_workers,
        "precision": args.precision,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "seed": args.seed,
        "pretrained": args.pretrained,
        "weight_averaging": args.weight_averaging,
        "lookahead_k": args.lookahead_k,
        "lookahead_alpha": args.lookahead_alpha,
    }
    if args.snapshots is not None:
        growth = 1.0 if args.cycle_growth is None else args.cycle_growth
        overrides.update(
            lr_schedule=LRSchedule.COSINE_RESTARTS,
            cosine_cycles=args.snapshots,
            snapshots=True,
            cosine_cycle_growth=growth,
        )
    elif args.cycle_growth is not None:
        raise ConfigError("--cycle-growth needs --snapshots N")
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
    if args.distill_from:
        teachers = tuple(str(Path(r).resolve()) for r in args.distill_from)
        kwargs["distill"] = DistillConfig(
            teachers, args.distill_weight, args.distill_temperature, args.distill_checkpoint
        )
    run_dir = train(Path(args.work), TrainConfig(**kwargs), resume=args.resume)
    record_postprocessing_prior(Path(args.work), run_dir, fold)
    print(f"training finished: {run_dir}")
    return 0


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

    best = find_best(Path(args.work), data_dir=args.data, metric=args.metric, try_crf=args.try_crf)
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
            device=resolve_device(args.device),
        )
    )
    print(result.summary())
    return 0
