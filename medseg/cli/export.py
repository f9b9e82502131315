"""``medseg export``: a portable model bundle (zip), or the networks as ONNX / TorchScript; ``medseg card``: the
model card of a work folder or bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.errors import ConfigError, MedsegError
from medseg.options import CheckpointName, ExportFormat, choices


def add_export_parser(sub: argparse._SubParsersAction, add_common) -> None:
    """Register the ``export`` subcommand on ``sub`` (``add_common`` adds ``--verbose``/``--quiet``)."""
    p = sub.add_parser(
        "export",
        help="write a model bundle (zip) for `medseg predict -m`, or the networks "
        "as ONNX / TorchScript with inference.json",
    )
    p.add_argument("work", help="work folder with trained runs (or, for --format onnx/torchscript, a bundle)")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="the zip to write (--format bundle), or the folder for the networks and inference.json",
    )
    p.add_argument(
        "--format",
        choices=choices(ExportFormat),
        default="bundle",
        help="default bundle: plan, weights, postprocessing and labels in one zip",
    )
    p.add_argument("--config", nargs="+", default=None, help="configuration(s) (default: find-best's choice)")
    p.add_argument("--arch", nargs="+", default=None, help="architecture(s) (default: find-best's choice)")
    p.add_argument("--folds", nargs="+", default=None, help="folds (default: every trained fold)")
    p.add_argument(
        "--checkpoint",
        choices=[c for c in choices(CheckpointName) if c != CheckpointName.SNAPSHOTS],  # a bundle: one per run
        default="final",
    )
    p.add_argument("--no-postprocessing", action="store_true", help="leave find-best's postprocessing out")
    add_common(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    bad = [f for f in args.folds or [] if f != "all" and not f.isdigit()]
    if bad:
        raise ConfigError(f"--folds takes fold numbers or 'all', got {bad}")
    folds = None if args.folds is None else [f if f == "all" else int(f) for f in args.folds]
    from medseg.ensembling.selection import RunSelection

    selection = RunSelection(
        configs=args.config,
        archs=args.arch,
        folds=folds,
        checkpoint=args.checkpoint,
        postprocessing=not args.no_postprocessing,
    )
    if args.format == ExportFormat.BUNDLE:
        from medseg.ensembling.bundle_export import export_bundle

        out = export_bundle(Path(args.work), Path(args.output), selection)
        print(f"model bundle written to {out}; predict with:\n  medseg predict -i IMAGES -o OUT -m {out}")
    else:
        from medseg.ensembling.bundle_export import export_networks

        out = export_networks(Path(args.work), Path(args.output), args.format, selection)
        print(f"{args.format} networks and {out.name} written to {out.parent}")
    return 0


def add_card_parser(sub: argparse._SubParsersAction, add_common) -> None:
    """Register the ``card`` subcommand on ``sub`` (``add_common`` adds ``--verbose``/``--quiet``)."""
    p = sub.add_parser(
        "card",
        help="print the model card (Markdown) of a work folder, or the MODEL_CARD.md a bundle carries",
    )
    p.add_argument("work", help="work folder (or a model bundle from `medseg export`)")
    add_common(p)
    p.set_defaults(func=cmd_card)


def cmd_card(args: argparse.Namespace) -> int:
    path = Path(args.work)
    if path.is_file():
        from medseg.inference.bundle import read_bundle_text
        from medseg.io.workdir import BundleLayout

        text = read_bundle_text(path, BundleLayout.MODEL_CARD)
        if text is None:
            raise MedsegError(
                f"{path}: the bundle carries no {BundleLayout.MODEL_CARD} (exported by an older medseg); "
                "run `medseg card WORK` on its work folder"
            )
    else:
        from medseg.ensembling.model_card import model_card

        if not path.is_dir():
            raise MedsegError(f"{path}: no such work folder or bundle")
        text = model_card(path)
    print(text, end="")
    return 0
