"""``medseg predict``: the predictor of a work folder or bundle, this process's share of the cases, and the
per-case outputs beside the segmentations (quality report and uncertainty maps, instances, DICOM SEG/RTSTRUCT,
statistics, previews)."""

from __future__ import annotations

import argparse
import datetime
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.cli.commands import resolve_device
from medseg.errors import ConfigError
from medseg.options import OutputFormat

if TYPE_CHECKING:
    from medseg.distributed import DistContext
    from medseg.inference.dicom_output import DicomOutputWriter
    from medseg.inference.folder import PredictionResult
    from medseg.inference.predictor import Predictor
    from medseg.inference.shards import Shard
    from medseg.postprocessing import InstanceWriter, PreviewWriter, QualityWriter, StatisticsWriter
    from medseg.postprocessing.crf_output import CrfPostprocess

logger = logging.getLogger("medseg")

#: How long ranks that finished their cases wait at the barrier for the slowest (then they leave the part files).
PREDICT_BARRIER_TIMEOUT = datetime.timedelta(hours=24)


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
    from medseg.inference.case_output import combine_hooks
    from medseg.inference.training_range import model_training_range

    device = resolve_device(args.device)
    if ranks.enabled and device == "cuda":  # one GPU per rank on its machine
        device = f"cuda:{ranks.local_rank % torch.cuda.device_count()}"
    instances = _instance_writer(args, shard)
    _check_dicom_output(args)
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
        max_ram_gb=args.max_ram,
    )
    dicom = _dicom_writer(args, predictor)
    reports = _report_writers(args, predictor, shard)
    quality = _quality_writer(args, predictor, shard)
    crf = _crf_hook(args, predictor)
    result = predict_folder(
        Path(args.input),
        Path(args.output),
        predictor,
        overwrite=args.overwrite,
        save_probabilities=args.save_probabilities,
        num_workers=args.num_workers or 1,
        time_budget_per_case=args.time_budget_per_case,
        case_hook=combine_hooks([crf, quality, instances, dicom, *reports]),  # the CRF first: it rewrites the labels
        shard=shard,
        training_range=model_training_range(Path(args.model)),
    )
    print(result.summary())
    if dicom is not None:
        print(f"{args.output_format} of {len(dicom.written)} case(s) written to {args.output}")
        if dicom.empty:
            print(f"  {len(dicom.empty)} case(s) without foreground have none: {', '.join(sorted(dicom.empty))}")
    if instances is not None:
        print(f"instances of {len(instances.written)} case(s) written to {instances.path}")
        stale = [c for c in result.skipped if c not in instances.cases]
        if stale:
            print(f"  {len(stale)} skipped case(s) have no instances (predict them again with --overwrite)")
    reported = _finish_reports(args, predictor, result, reports)
    _finish_quality(quality, result)
    if ranks.enabled:
        _merge_rank_files(ranks, Path(args.output), instances, [*reports, quality])
    return 0 if result.ok and reported else 1


def _crf_hook(args: argparse.Namespace, predictor: Predictor) -> CrfPostprocess | None:
    """The dense-CRF case hook of ``--postprocess crf`` (or of the rules when find-best kept a CRF); else None."""
    from medseg.postprocessing.crf import CrfParams
    from medseg.postprocessing.crf_output import CrfPostprocess, crf_params_of

    rules = getattr(getattr(predictor, "postprocess", None), "rules", None)  # RulesPostprocess holds its rules
    params = crf_params_of(rules)
    if args.postprocess == "crf":
        params = params or CrfParams()
    return None if params is None else CrfPostprocess(params, rules)


def _merge_rank_files(
    ranks: DistContext,
    output: Path,
    instances: InstanceWriter | None,
    reports: list[StatisticsWriter | PreviewWriter | QualityWriter],
) -> None:
    """Wait for every rank, then let rank 0 fold the ranks' part files into the folder files (a rank that did
    not arrive leaves them for the next plain run to merge)."""
    from medseg.inference.prediction_record import RECORD_NAME, merge_record_parts
    from medseg.postprocessing import QualityWriter, StatisticsWriter

    try:
        ranks.barrier()
    except RuntimeError as exc:  # a rank died or the slowest took too long: a plain run merges later
        logger.warning("the ranks did not all finish (%s); the folder's part files are left to merge", exc)
        return
    if not ranks.is_main:
        return
    merged = merge_record_parts(output / RECORD_NAME)
    merged = (instances is not None and instances.merge_parts()) or merged
    for writer in reports:
        merged = (isinstance(writer, StatisticsWriter | QualityWriter) and writer.merge_parts()) or merged
    if merged:
        print(f"merged the folder records of {ranks.world_size} ranks in {output}")


def _check_dicom_output(args: argparse.Namespace) -> None:
    """Refuse a DICOM output format for an input folder of image files, before any model is loaded.

    Raises:
        ConfigError: ``--output-format dicom-seg|rtstruct`` with image files (not DICOM series) at the input's top.
    """
    from medseg.inference.folder_cases import holds_image_files

    if args.output_format == OutputFormat.NIFTI or not Path(args.input).is_dir():
        return
    if holds_image_files(Path(args.input)):
        raise ConfigError(
            f"--output-format {args.output_format} needs DICOM input series; {args.input} holds image files "
            "(a DICOM SEG/RTSTRUCT references the DICOM images a case was read from)"
        )


def _dicom_writer(args: argparse.Namespace, predictor: Predictor) -> DicomOutputWriter | None:
    """The DICOM SEG / RTSTRUCT writer of ``predict --output-format`` (None for NIfTI output); each case's series
    comes with the case (DICOM input)."""
    from medseg.inference.dicom_output import DicomOutputWriter

    if args.output_format == OutputFormat.NIFTI:
        return None
    plan = predictor.plan
    model_id = f"{plan.dataset_name} {predictor.describe()} ({Path(args.model).name})"
    return DicomOutputWriter(args.output_format, None, dict(zip(plan.label_ids, plan.label_names)), model_id)


def _report_writers(
    args: argparse.Namespace, predictor: Predictor, shard: Shard | None
) -> list[StatisticsWriter | PreviewWriter]:
    """The case hooks of ``predict --statistics`` and ``--preview`` (label names from the model's plan; a shard
    writes its part of the statistics)."""
    from medseg.postprocessing import PreviewWriter, StatisticsWriter

    if not (args.statistics or args.preview):
        return []
    names = {int(i): str(n) for i, n in zip(predictor.plan.label_ids, predictor.plan.label_names)}
    writers: list[StatisticsWriter | PreviewWriter] = []
    if args.statistics:
        writers.append(StatisticsWriter(Path(args.output), names, shard))
    if args.preview:
        writers.append(PreviewWriter(Path(args.output), names))
    return writers


def _finish_reports(
    args: argparse.Namespace,
    predictor: Predictor,
    result: PredictionResult,
    reports: list[StatisticsWriter | PreviewWriter],
) -> bool:
    """Report the skipped cases the writers lack from their existing segmentations, and say what was written.

    Returns:
        False when a skipped case could not be reported.
    """
    from medseg.postprocessing import StatisticsWriter, revisit_skipped

    if not reports:
        return True
    plan = predictor.plan
    revisited = revisit_skipped(
        Path(args.input), Path(args.output), result.skipped, plan.num_channels, plan.label_ids, reports
    )
    for writer in reports:
        if isinstance(writer, StatisticsWriter):
            print(f"statistics of {len(writer.cases)} case(s) in {writer.path} and {writer.csv_path.name}")
        else:
            print(f"previews of {len(writer.written)} case(s) written to {writer.folder}")
    if revisited.done:
        print(f"  {len(revisited.done)} skipped case(s) reported from their existing segmentations")
    for case, message in revisited.failed.items():
        print(f"  {case}: not reported: {message}")
    return not revisited.failed


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


def _quality_writer(args: argparse.Namespace, predictor: Predictor, shard: Shard | None) -> QualityWriter:
    """The case hook writing ``OUT/quality.json`` (always) and, with ``--uncertainty``, the uncertainty maps; it
    applies find-best's temperature and quality fit when the predictor's postprocessing rules carry them, else
    the heuristic score with the training volumes of the work folder the predictor came from (its fingerprint;
    every member of a work folder's ensemble shares it)."""
    from medseg.postprocessing import QualityWriter
    from medseg.postprocessing.quality_reference import with_reference_quality

    rules = getattr(getattr(predictor, "postprocess", None), "rules", None)  # RulesPostprocess carries them
    fitted = dict(rules) if isinstance(rules, dict) else {}
    plan = getattr(predictor, "plan", None)
    names = {} if plan is None else {int(i): str(n) for i, n in zip(plan.label_ids, plan.label_names)}
    if plan is not None and Path(args.model).is_dir():
        fitted = with_reference_quality(fitted, Path(args.model), plan.label_ids)
    return QualityWriter(
        Path(args.output),
        fitted or None,
        names,
        uncertainty=args.uncertainty,
        save_probabilities=args.save_probabilities,
        shard=shard,
        review_below=args.review_below,
    )


def _finish_quality(quality: QualityWriter, result: PredictionResult) -> None:
    """List the skipped cases the quality report lacks (verdict review: not assessed) and summarise it."""
    added = quality.list_skipped(result.skipped)
    review = sorted(c for c in quality.written if quality.cases[c]["verdict"] == "review")
    print(
        f"quality of {len(quality.written)} case(s) in {quality.path} (temperature {quality.temperature:.3g}, "
        f"{quality.model.source} score): {len(review)} to review" + (f": {', '.join(review[:10])}" if review else "")
    )
    if quality.uncertainty:
        print(f"  uncertainty maps in {Path(quality.output_dir) / 'uncertainty'}")
    if added:
        print(f"  {len(added)} skipped case(s) listed as not assessed (predict them again with --overwrite)")
