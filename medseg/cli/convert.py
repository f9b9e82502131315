"""``medseg convert``: DICOM image series with SEG/RTSTRUCT annotations -> a training dataset folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg.options import SegmentOverlaps, choices


def add_convert_parser(sub: argparse._SubParsersAction, add_common) -> None:
    """Register the ``convert`` subcommand on ``sub`` (``add_common`` adds ``--verbose``/``--quiet``)."""
    p = sub.add_parser(
        "convert",
        help="turn DICOM series with DICOM SEG / RTSTRUCT annotations into a dataset folder for `medseg plan`",
    )
    p.add_argument("dicom", help="folder of DICOM files (searched recursively): image series and their annotations")
    p.add_argument("-o", "--output", required=True, help="dataset folder to write (imagesTr, labelsTr, dataset.json)")
    p.add_argument(
        "--overlaps",
        choices=choices(SegmentOverlaps),
        default=SegmentOverlaps.ERROR.value,
        help="overlapping segments: 'error' (default) refuses them naming each pair; 'regions' writes "
        "region-based labels (each segment a region)",
    )
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already has a dataset.json")
    add_common(p)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    """Run :func:`medseg.io.dicom_convert.convert_dicom`; exit status 1 when a series or annotation failed."""
    from medseg.io.dicom_convert import convert_dicom

    result = convert_dicom(Path(args.dicom), Path(args.output), overlaps=args.overlaps, overwrite=args.overwrite)
    print(result.summary())
    return 0 if result.ok else 1
