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
    CheckpointName,
    DeviceKind,
    LesionMatching,
    Optimizer,
    OutputFormat,
    Precision,
    SelectionMetric,
    Switch,
    WeightAveraging,
    choices,
)

logger = logging.getLogger("medseg")

EXIT_USER_ERROR = 2


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")


def _seconds_per_case(text: str) -> float | str | None:
    """``--time-budget-per-case``: positive seconds, ``none`` (no limit) or ``auto`` (the default rule)."""
    word = text.strip().lower()
    if word in ("none", "auto"):
        return None if word == "none" else "auto"
    try:
        seconds = float(word)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, 'none' (no limit) or 'auto', got {text!r}")
    return seconds


def _gigabytes(text: str) -> float | str | None:
    """``--max-ram``: positive GB, ``none`` (no limit) or ``auto`` (a share of the available memory)."""
    word = text.strip().lower()
    if word in ("none", "auto"):
        return None if word == "none" else "auto"
    try:
        gb = float(word)
    except ValueError:
        gb = float("nan")
    if not gb > 0:
        raise argparse.ArgumentTypeError(f"expected GB > 0, 'none' (no limit) or 'auto', got {text!r}")
    return gb


def build_parser() -> argparse.ArgumentParser:
    from medseg.cli import commands as c
    from medseg.cli.convert import add_convert_parser
    from medseg.cli.export import add_card_parser, add_export_parser
    from medseg.cli.predict import cmd_predict

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
        help="fine-tune: start from a model.zip (`medseg export`) or a run's checkpoint_*.pt; tensors "
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

    p = sub.add_parser("predict", help="segment every image of a folder")
    p.add_argument("-i", "--input", required=True, help="folder of images (CASE.nii.gz or CASE_0000.nii.gz ...)")
    p.add_argument("-o", "--output", required=True, help="folder for the segmentations (not inside the input)")
    p.add_argument(
        "-m",
        "--model",
        required=True,
        help="work folder with trained runs, or a model bundle (.zip) from `medseg export`",
    )
    p.add_argument("--config", nargs="+", default=None, help="configuration(s) to ensemble")
    p.add_argument("--arch", nargs="+", default=None, help="architecture(s) to ensemble")
    p.add_argument("--folds", nargs="+", default=None, help="folds to ensemble (default: every trained fold)")
    p.add_argument(
        "--checkpoint",
        choices=choices(CheckpointName),
        default="final",
        help="snapshots: every checkpoint_snapshot_<i>.pt of each run (`train --snapshots N`) is a member",
    )
    p.add_argument(
        "--no-tta", action="store_true", help="disable test-time augmentation (mirroring and shifts of the patch grid)"
    )
    p.add_argument("--step", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument(
        "--time-budget-per-case",
        type=_seconds_per_case,
        default="auto",
        metavar="SECONDS",
        help="seconds one case may take (reading, network, export): where a case's estimate exceeds "
        "it, fewer TTA passes (8 -> 4 -> 2 -> 1), then less window overlap (0.5 -> 0.33 -> 0.25 "
        "-> 0); 'none': no limit. Default (auto): on the CPU, a plan with a training time budget "
        "gets 10%% of it over 20 cases (30 minutes: 9 s per case), otherwise no limit. "
        "OUT/prediction_record.json records what each case used and took",
    )
    p.add_argument(
        "--max-ram",
        type=_gigabytes,
        default="auto",
        metavar="GB",
        help="RAM one case may take (GB = 10^9 bytes): a case whose memory plan exceeds it is streamed "
        "(accumulators on a memory-mapped file in the output folder, resampled and argmaxed class by class; "
        "the same segmentation). Default (auto): 80%% of the memory available at the start; 'none': no "
        "limit. OUT/prediction_record.json records each case's plan",
    )
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write OUT/CASE.npz: the class probabilities (calibrated with find-best's temperature)",
    )
    p.add_argument(
        "--uncertainty",
        action="store_true",
        help="also write OUT/uncertainty/CASE.nii.gz: per voxel the normalised predictive entropy (0-1) of the "
        "calibrated mean probabilities over ensemble members and TTA passes, in the input geometry "
        "(OUT/quality.json, a per-case quality score and ok/review verdict, is always written)",
    )
    p.add_argument("--no-postprocessing", action="store_true")
    p.add_argument(
        "--postprocess",
        choices=["auto", "crf"],
        default="auto",
        help="auto: the postprocessing find-best chose (a dense CRF only if it kept one); crf: always run a dense "
        "CRF over the probabilities and the image before the component rules",
    )
    p.add_argument(
        "--instances",
        action="store_true",
        help="also write OUT/CASE_instances.nii.gz (one id per object: connected components per class) and "
        "OUT/instances.json (per object: label, volume in mL, centroid and bounding box in world mm, mean "
        "probability as score)",
    )
    p.add_argument(
        "--instance-connectivity",
        type=int,
        choices=(1, 2, 3),
        default=None,
        help="with --instances: voxels sharing a face (1), also an edge (2) or also a vertex (3, default) connect",
    )
    p.add_argument(
        "--split-touching",
        action="store_true",
        help="with --instances: split touching objects (distance-transform watershed, on the probabilities)",
    )
    p.add_argument(
        "--min-separation-mm",
        type=float,
        default=None,
        metavar="MM",
        help="with --split-touching: the smallest distance between the centres of split objects (default 10)",
    )
    p.add_argument(
        "--output-format",
        choices=choices(OutputFormat),
        default=OutputFormat.NIFTI.value,
        help="nifti (default): OUT/CASE.nii.gz only; dicom-seg / rtstruct: also OUT/CASE_seg.dcm (DICOM SEG) / "
        "OUT/CASE_rtstruct.dcm (RTSTRUCT) referencing the case's input DICOM series (needs DICOM input)",
    )
    p.add_argument(
        "--statistics",
        action="store_true",
        help="also write OUT/statistics.json and OUT/statistics.csv: per case and label the volume in mL, voxel "
        "count, connected components (26-connectivity), world bounding box in mm and mean/std of the input "
        "intensity inside the structure (HU for CT); skipped cases are computed from their existing segmentation",
    )
    p.add_argument(
        "--preview",
        action="store_true",
        help="also write OUT/previews/CASE.png: axial, coronal and sagittal slices through the largest "
        "structure with a coloured, labelled overlay",
    )
    p.add_argument("--device", choices=choices(DeviceKind), default=None)
    p.add_argument("--overwrite", action="store_true", help="re-predict cases whose output exists")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument(
        "--part",
        default=None,
        metavar="K/N",
        help="predict only part K (1-based) of N of the cases, split by size (a Slurm array task: "
        "--part $SLURM_ARRAY_TASK_ID/N with --array=1-N); a plain run afterwards merges the parts' records. "
        "Under torchrun the ranks split the cases without it (docs/scale.md)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_predict)

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
        help="also try a dense CRF after the component rules on the CV cases; kept only if it raises the mean Dice",
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
