"""The ``medseg predict`` command line: its options (what each writes, the budgets it keeps)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from medseg.options import CheckpointName, DeviceKind, OutputFormat, choices

__all__ = ["add_predict_parser"]


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


def _dice_level(text: str) -> float:
    """``--review-below``: a Dice between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a Dice between 0 and 1, got {text!r}")
    return value


def add_predict_parser(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register the ``predict`` subcommand on ``sub`` (``add_common`` adds ``--verbose``/``--quiet``)."""
    from medseg.cli.predict import cmd_predict

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
    p.add_argument(
        "--review-below",
        type=_dice_level,
        default=None,
        metavar="DICE",
        help="your acceptance level: quality.json's verdict is 'review' for a case whose predicted mean foreground "
        "Dice (its score) is below DICE (default: the model's own threshold, its cross-validation median minus "
        "0.07: a case unusual for this model, so a weak model's typical cases pass)",
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
    add_common(p)
    p.set_defaults(func=cmd_predict)
