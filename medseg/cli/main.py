"""``medseg`` command line: thin argparse wrappers over the library API.

Every subcommand builds dataclasses and calls one library function. Expected mistakes
(:class:`~medseg.errors.MedsegError`) and failures of the file system (``OSError``: disk full, permission
denied) print one clear message and exit with status 2, no traceback (``--verbose`` logs it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from medseg.errors import MedsegError
from medseg.options import (
    DeviceKind,
    LesionMatching,
    Optimizer,
    Precision,
    SelectionMetric,
    Switch,
    WeightAveraging,
    choices,
)
from medseg.progress import set_progress

logger = logging.getLogger("medseg")

EXIT_USER_ERROR = 2


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")


def build_parser() -> argparse.ArgumentParser:
    from medseg.cli import commands as c
    from medseg.cli.convert import add_convert_parser
    from medseg.cli.export import add_card_parser, add_export_parser
    from medseg.cli.predict_args import add_predict_parser

    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Self-configuring medical image segmentation: plan -> train -> predict.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("plan", help="validate a dataset, fingerprint it, plan and preprocess")
    p.add_argument("data", help="dataset folder (MSD or nnU-Net v2 layout with dataset.json)")
    p.add_argument("-o", "--output", required=True, help="work folder to write plans.json and the cache into")
    p.add_argument("--gpu-memory-gb", type=float, default=8.0, help="memory budget for one training step (default 8)")
    p.add_argument("--archs", nargs="+", default=["unet"], help="architectures to plan (default: unet)")
    p.add_argument("--configs", nargs="+", default=None, help="configurations to preprocess (default: all planned)")
    p.add_argument(
        "--device",
        choices=choices(DeviceKind),
        default=None,
        help="device training will use (default: cuda if available else cpu)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="plan for a training time budget: measure real step times and pick what learns most "
        "(the measuring takes at most 10%% of the budget)",
    )
    p.add_argument("--num-workers", type=int, default=None, help="parallel processes (default: CPU count)")
    p.add_argument("--no-preprocess", action="store_true", help="write the plan only")
    _add_common(p)
    p.set_defaults(func=c.cmd_plan)

    p = sub.add_parser("train", help="train one fold of one configuration/architecture")
    p.add_argument("work", help="work folder written by `medseg plan`")
    p.add_argument("--config", default=None, help="configuration (default: the plan's default)")
    p.add_argument("--arch", default=None, help="architecture (default: the plan's default, unet)")
    p.add_argument("--fold", default="0", help="fold 0-4, or 'all' to train on every case")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iters-per-epoch", type=int, default=None)
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="the whole command (refitting the plan when it is not fitted to this budget and device, "
        "training, checkpoints, final validation) finishes within this many minutes; the learning "
        "rate is annealed over time",
    )
    p.add_argument(
        "--keep-plan",
        action="store_true",
        help="with --time-budget: train the plan as it is even when it is not fitted to the budget "
        "(a warning gives the iterations to expect)",
    )
    p.add_argument("--resume", action="store_true", help="continue from checkpoint_latest")
    p.add_argument(
        "--pretrained",
        default=None,
        metavar="MODEL",
        help="fine-tune: start from a model.zip (`medseg export`) or a run's checkpoint_*.pt (for MONAI-backed "
        "architectures also a MONAI state dict .pt/.pth, e.g. a MONAI bundle's or Auto3DSeg's model.pt); tensors "
        "whose name and shape match are loaded (a first layer for other channels and heads for "
        "other classes start fresh); with --time-budget the plan's network is kept (no refit)",
    )
    p.add_argument("--device", choices=choices(DeviceKind), default=None)
    p.add_argument("--num-workers", type=int, default=None, help="data-loading workers")
    p.add_argument("--precision", choices=choices(Precision), default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--optimizer",
        choices=choices(Optimizer),
        default=None,
        help="default auto: AdamW (lr 3e-3) for time-budgeted runs, SGD (Nesterov 0.99, lr 1e-2) otherwise",
    )
    p.add_argument("--lookahead-k", type=int, default=None, help="lookahead-*: inner steps per sync (default 5)")
    p.add_argument(
        "--lookahead-alpha", type=float, default=None, help="lookahead-*: slow-weight step size (default 0.5)"
    )
    p.add_argument(
        "--snapshots",
        type=int,
        default=None,
        metavar="N",
        help="snapshot ensemble: N cosine cycles with warm restarts over the run (epochs or time budget), the "
        "weights at the end of each saved as checkpoint_snapshot_<i>.pt; predict them with --checkpoint snapshots",
    )
    p.add_argument(
        "--distill-from",
        nargs="+",
        default=None,
        metavar="RUN",
        help="distillation: also learn the soft predictions of these trained run folders (the teacher ensemble, "
        "same configuration) by temperature-scaled KL beside Dice+CE",
    )
    p.add_argument("--distill-weight", type=float, default=1.0, help="weight of the distillation KL (default 1)")
    p.add_argument("--distill-temperature", type=float, default=2.0, help="distillation temperature (default 2)")
    p.add_argument(
        "--distill-checkpoint",
        choices=["final", "best", "snapshots"],
        default="final",
        help="the teachers' checkpoint (snapshots: every snapshot of each teacher run)",
    )
    p.add_argument(
        "--cycle-growth",
        type=float,
        default=None,
        help="with --snapshots: length of a cycle over the previous one (default 1: equal cycles; 2: SGDR's doubling)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--intensity-augmentation",
        choices=choices(Switch),
        default="auto",
        help="noise, blur, brightness, contrast, low-resolution and gamma transforms; default auto: on, except "
        "in a time-budgeted run whose training cases show alike label intensities (>= 10 cases, across-case "
        "spread < 0.4; recorded in run_record.json); spatial transforms and mirroring stay on",
    )
    p.add_argument(
        "--weight-averaging",
        choices=choices(WeightAveraging),
        default=None,
        help="ema: checkpoint_final holds an exponential moving average of the weights over the last "
        "part of the run; default auto: ema for time-budgeted runs, off otherwise",
    )
    p.add_argument("--no-validation", action="store_true", help="skip the final sliding-window validation")
    _add_common(p)
    p.set_defaults(func=c.cmd_train)

    add_predict_parser(sub, _add_common)

    p = sub.add_parser("evaluate", help="Dice, IoU, HD95 and surface Dice of predictions against references")
    p.add_argument("pred", help="folder of predicted segmentations")
    p.add_argument("ref", help="folder of reference segmentations")
    p.add_argument("-o", "--output", default=None, help="metrics JSON path (a CSV is written beside it)")
    p.add_argument("--labels", nargs="+", type=int, default=None, help="label ids to evaluate (default: all found)")
    p.add_argument(
        "--ignore-label",
        type=int,
        default=None,
        help="reference id of unannotated voxels, left out of both maps (default: the 'ignore' label "
        "of the reference dataset's dataset.json, if any)",
    )
    p.add_argument(
        "--lesion-wise",
        action="store_true",
        help="also lesion-wise metrics per class: TP/FP/FN, precision, recall, F1, lesion Dice, lesion HD95, PQ",
    )
    p.add_argument(
        "--lesion-matching",
        choices=choices(LesionMatching),
        default=LesionMatching.IOU.value,
        help="iou: one-to-one Hungarian matching at IoU >= 0.5; brats: BraTS 2023 dilated-reference overlap",
    )
    p.add_argument(
        "--min-lesion-volume",
        type=float,
        default=0.0,
        metavar="ML",
        help="leave lesions smaller than this many mL out of prediction and reference (default 0: all count)",
    )
    p.add_argument("--num-workers", type=int, default=None)
    _add_common(p)
    p.set_defaults(func=c.cmd_evaluate)

    p = sub.add_parser("find-best", help="pick the best configuration/ensemble and postprocessing on CV")
    p.add_argument("work", help="work folder with trained runs")
    p.add_argument(
        "--metric",
        choices=choices(SelectionMetric),
        default=SelectionMetric.DICE.value,
        help="rank candidates and fit postprocessing by mean foreground Dice (default) or a lesion-wise metric",
    )
    p.add_argument(
        "--try-crf",
        action="store_true",
        help="also try a dense CRF after the component rules on the CV cases; kept only if it raises the mean "
        "Dice by at least 2 paired standard errors of the per-case gain",
    )
    p.add_argument("--data", default=None, help="dataset folder (default: the one `medseg plan` recorded)")
    _add_common(p)
    p.set_defaults(func=c.cmd_find_best)

    add_export_parser(sub, _add_common)
    add_card_parser(sub, _add_common)
    add_convert_parser(sub, _add_common)

    p = sub.add_parser("demo", help="run the whole pipeline on a synthetic dataset generated on the fly")
    p.add_argument("-o", "--output", default="medseg_demo", help="folder to work in (default ./medseg_demo)")
    p.add_argument("--minutes", type=float, default=3.0, help="training time budget in minutes (default 3)")
    p.add_argument("--num-cases", type=int, default=12)
    p.add_argument("--device", choices=choices(DeviceKind), default=None)
    _add_common(p)
    p.set_defaults(func=c.cmd_demo)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.INFO
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    elif getattr(args, "quiet", False):
        level = logging.WARNING
    set_progress(not getattr(args, "quiet", False))  # --quiet: only warnings and errors, no progress bars
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Returns the process exit status (0 ok, 1 partial failure, 2 user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        from medseg import faults

        faults.arm(os.environ.get(faults.ENV_VAR))  # test-only fault injection (medseg.faults); off when unset
        return int(func(args) or 0)
    except MedsegError as exc:
        print(f"medseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # disk full, permission denied, read-only file system ...: the system's own words
        logger.debug("%s failed", args.command, exc_info=True)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"medseg {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130
