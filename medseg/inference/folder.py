"""Segment every case of a folder with a :class:`~medseg.inference.predictor.Predictor`.

:func:`predict_folder` discovers the cases (tolerating malformed ones), skips those already predicted,
reads/preprocesses upcoming cases and writes finished ones on worker threads while the network runs,
writes each segmentation with exactly the input's origin, spacing and direction, and collects per-case
errors instead of stopping at the first bad case (:class:`PredictionResult`). With a time budget per case it
chooses each case's TTA passes and window overlap to fit it (:mod:`medseg.inference.time_budget`); what
every case used and took is recorded in ``OUT/prediction_record.json``. With a :class:`~medseg.inference.shards.Shard`
it predicts only its share of the cases (``torchrun`` ranks, ``--part K/N``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.faults import maybe_fail
from medseg.inference.case_grid import PreparedCase
from medseg.inference.case_output import CaseHook, finished_case
from medseg.inference.export import write_probabilities, write_segmentation
from medseg.inference.folder_cases import (
    DicomCase,
    case_error_message,
    case_suffix,
    check_folders,
    check_writable,
    find_input_cases,
    nonfinite_message,
    read_case,
)
from medseg.inference.input_guard import TrainingRange, guard_case
from medseg.inference.prediction_record import (
    RECORD_NAME,
    CaseRecord,
    merge_record_parts,
    read_record_cases,
    record_document,
    write_record,
)
from medseg.inference.prediction_result import PredictionResult
from medseg.inference.predictor import Predictor
from medseg.inference.shards import Shard, select_shard
from medseg.inference.time_budget import (
    PREDICTION_SHARE,
    REFERENCE_TEST_CASES,
    CaseBudget,
    default_seconds_per_case,
    export_seconds,
)
from medseg.progress import progress_bar

logger = logging.getLogger(__name__)


def resolve_time_budget(time_budget_per_case: float | str | None, predictor: Predictor) -> tuple[float | None, str]:
    """The per-case budget in seconds (None = no limit) and a few words on where it came from.

    ``"auto"``: :func:`~medseg.inference.time_budget.default_seconds_per_case` of the members' training budget
    (each member's plan has one: the largest) on the predictor's device.

    Raises:
        MedsegError: a budget that is not a positive number, None or ``"auto"``.
    """
    if time_budget_per_case is None:
        return None, "no limit"
    if time_budget_per_case == "auto":
        budgets = [m.plan.time_budget_minutes for s in predictor._stages() for m in s.members]
        minutes = None if any(b is None for b in budgets) else max(float(b) for b in budgets if b is not None)
        seconds = default_seconds_per_case(minutes, predictor.device.type)
        if seconds is None:
            why = "the plan has no training time budget" if minutes is None else f"on {predictor.device.type}"
            return None, f"no limit by default: {why}"
        return seconds, (
            f"default: {PREDICTION_SHARE:.0%} of the {minutes:g}-minute training budget over "
            f"{REFERENCE_TEST_CASES} cases"
        )
    if isinstance(time_budget_per_case, str) or not time_budget_per_case > 0:
        raise MedsegError(
            f"the time budget per case must be a positive number of seconds, None or 'auto', "
            f"got {time_budget_per_case!r}"
        )
    return float(time_budget_per_case), "given"


def predict_folder(
    input_dir: str | Path,
    output_dir: str | Path,
    predictor: Predictor,
    overwrite: bool = False,
    save_probabilities: bool = False,
    num_workers: int = 1,
    progress: bool = True,
    time_budget_per_case: float | str | None = None,
    case_hook: CaseHook | None = None,
    shard: Shard | None = None,
    training_range: TrainingRange | None = None,
) -> PredictionResult:
    """Segment every case of a folder.

    Cases are found with :func:`medseg.io.dataset.find_prediction_cases` (MSD ``CASE.nii.gz`` or nnU-Net
    ``CASE_0000.nii.gz`` naming) or, in a folder without such files, are the DICOM image series found under
    it (:func:`~medseg.inference.folder_cases.find_input_cases`; output ``OUT/<case>.nii.gz``, the series'
    geometry). Output files are ``OUT/CASE<ending>`` (original label ids, the input's
    geometry, NIfTI header copied from the input); with ``save_probabilities`` also ``OUT/CASE.npz``
    holding ``probabilities`` float16 ``(K, Z, Y, X)`` on the original grid and ``label_ids``. A case that
    fails (missing/extra channel files, unreadable or truncated file, NaN/Inf voxels, a 2D image for a 3D
    model, a refused write, ...) is reported and the others are still written. Every file is written to
    a temporary name and renamed, so an output under its final name is always complete.

    Args:
        input_dir: folder of images.
        output_dir: folder for segmentations; must not be ``input_dir`` or inside it. Created if needed.
        predictor: the ensemble.
        overwrite: re-predict cases whose output exists (default: skip them).
        save_probabilities: also write the probabilities.
        num_workers: threads reading/preprocessing upcoming cases and writing finished ones while the
            network runs.
        progress: tqdm bar over the cases.
        time_budget_per_case: seconds one case may take (reading, network, export), met by fewer TTA passes,
            then less window overlap (:mod:`medseg.inference.time_budget`); None = no limit; ``"auto"`` =
            the default of :func:`resolve_time_budget` (on the CPU 10% of the plan's training budget over
            20 cases, else no limit). Every written case is recorded in ``OUT/prediction_record.json``
            (earlier cases' entries are kept).
        case_hook: called with every case's :class:`~medseg.inference.case_output.FinishedCase` (label map,
            class probabilities on request) before its segmentation is written; an exception fails the case.
        shard: predict only this share of the cases (:func:`~medseg.inference.shards.select_shard`; malformed
            cases are reported by shard 0) and write ``prediction_record.part-K-of-N.json``; None = every case,
            first merging the parts earlier shards left (:func:`~medseg.inference.prediction_record.merge_record_parts`).
        training_range: what the input guard compares each image with (None: the plan's median spacing).

    Returns:
        :class:`PredictionResult` (``ok`` is False when any case failed).

    Raises:
        MedsegError: missing input folder, output inside input or not writable, no images in the folder,
            or a budget that is not a positive number.
    """
    t0 = time.perf_counter()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_folders(input_dir, output_dir)
    plan = predictor.plan
    budget_seconds, budget_rule = resolve_time_budget(time_budget_per_case, predictor)
    clock = CaseBudget(budget_seconds, predictor.budget_options())
    cases, bad_cases, input_warnings = find_input_cases(input_dir, plan.num_channels)
    if not cases and not bad_cases:
        raise MedsegError(
            f"{input_dir}: no images found (expected CASE.nii.gz or CASE_0000.nii.gz, ..., or DICOM image series)"
        )
    check_writable(output_dir)
    if shard is not None:
        cases, bad_cases = select_shard(cases, shard), bad_cases if shard.index == 0 else {}
    result = PredictionResult(output_dir=output_dir, time_budget=budget_seconds, budget_rule=budget_rule, shard=shard)
    result.failed.update(bad_cases)
    if budget_seconds is not None:
        logger.info(
            "time budget %.1f s per case (%s): fewer TTA passes, then less window overlap, where a "
            "case's estimate exceeds it",
            budget_seconds,
            budget_rule,
        )
    record_path = output_dir / RECORD_NAME if shard is None else shard.part_path(output_dir / RECORD_NAME)
    if shard is None:
        merge_record_parts(record_path)
    earlier_records = read_record_cases(record_path)
    guarded, warned = training_range or TrainingRange.from_plan(plan), dict[str, tuple[str, ...]]()
    for warning in input_warnings:
        result.warnings.append(warning)
        logger.warning(warning)

    todo = []
    for case in cases:
        target = output_dir / f"{case.case_id}{case_suffix(case.image_files[0])}"
        if target.exists() and not overwrite:
            result.skipped.append(case.case_id)
        else:
            todo.append((case, target))
    if result.skipped:
        logger.info(
            "%d case(s) already predicted in %s; skipping them (use --overwrite to redo)",
            len(result.skipped),
            output_dir,
        )

    def load(case: Any) -> tuple[PreparedCase, float]:
        start = time.perf_counter()
        files = list(case.image_files)
        image, geometry = read_case(case, plan.num_channels)
        if image.ndim not in (3, 4):
            raise MedsegError(f"{files[0]}: expected a 2D or 3D image, got shape {list(image.shape[1:])}")
        if not np.isfinite(image.sum(dtype=np.float64)):  # formats other than NIfTI keep NaN/Inf
            for f, channel in zip(files, image):
                if not np.isfinite(channel).all():
                    raise MedsegError(nonfinite_message(f, int(np.isnan(channel).sum()), int(np.isinf(channel).sum())))
        three_d = [c for c in predictor.configurations if plan.configuration(c).dims == 3]
        if geometry.ndim == 2 and three_d:
            raise MedsegError(
                f"{files[0]}: a 2D image (shape {list(geometry.shape)}), but configuration "
                f"{three_d[0]!r} of the model is 3D; predict 2D images with a 2D configuration "
                "(--config 2d)"
            )
        warned[case.case_id] = guard_case(case.case_id, image, geometry, guarded, result.warnings)
        return predictor.preprocess(image, geometry, case.case_id), time.perf_counter() - start

    def infer(prepared: PreparedCase, load_seconds: float) -> tuple[list, CaseRecord, float]:
        """Run the networks on a case within its budget: (inferred, its record, raw export estimate)."""
        raw_write = export_seconds(int(np.prod(prepared.geometry.shape)), predictor.num_classes)
        if clock.seconds_per_case is None:
            full = clock.full
            record = CaseRecord(full.passes, full.overlap, full.passes, full.overlap, load_seconds=load_seconds)
            setting, raw_network = None, 0.0
        else:
            jobs = predictor.case_jobs(prepared)
            start = time.perf_counter()
            per_window = predictor.seconds_per_window({j.key for j in jobs})
            measure = time.perf_counter() - start
            setting, record, raw_network = clock.choose(jobs, per_window, load_seconds + measure, raw_write)
            record.load_seconds, record.measure_seconds = load_seconds, measure
            if setting != clock.full:
                logger.info(
                    "%s: TTA %d pass(es), overlap %g to fit %.1f s (estimated %.1f s)",
                    prepared.case_id,
                    setting.passes,
                    setting.overlap,
                    clock.seconds_per_case,
                    record.estimated_seconds,
                )
        memory = predictor.memory_plan(prepared, setting, save_probabilities)
        record.memory = memory.to_dict()
        if memory.stream:
            logger.info(
                "%s: streamed (estimated peak %.1f GB, budget %.1f GB): accumulators on a memory map in %s",
                prepared.case_id,
                memory.peak_bytes / 1e9,
                (memory.budget_bytes or 0) / 1e9,
                output_dir,
            )
        start = time.perf_counter()
        inferred = predictor._infer(prepared, setting, memory, scratch_dir=output_dir)
        record.network_seconds = time.perf_counter() - start
        if setting is not None:
            clock.network_done(raw_network, record.network_seconds)
        return inferred, record, raw_write

    def save_record() -> None:
        document = record_document({**earlier_records, **result.records}, budget_seconds, budget_rule, clock.options)
        try:
            write_record(record_path, document)
        except OSError as exc:
            warning = f"{record_path}: cannot write the prediction record ({exc.strerror or exc})"
            if warning not in result.warnings:
                result.warnings.append(warning)
                logger.warning(warning)

    def finish(case: Any, target: Path, inferred: list) -> float:
        start = time.perf_counter()
        geometry = inferred[0][1].geometry
        probs = None
        if save_probabilities:
            probs = predictor._combine(inferred)
            del inferred[:]
            write_probabilities(output_dir / f"{case.case_id}.npz", probs, predictor.label_ids)
            seg = predictor.probabilities_to_labels(probs, geometry.spacing)
        else:
            seg = predictor.indices_to_labels(predictor._combine_labels(inferred), geometry.spacing)
        if case_hook is not None:
            case_hook(
                finished_case(
                    case.case_id,
                    seg,
                    geometry,
                    target,
                    case.image_files[0],
                    predictor.plan,
                    probs,
                    inferred,
                    source_series=case.series if isinstance(case, DicomCase) else None,
                    input_warnings=warned.pop(case.case_id, ()),
                )
            )
        del inferred[:], probs
        try:
            write_segmentation(seg, geometry, target, reference=case.image_files[0])
        except OSError as exc:
            raise MedsegError(f"{target}: cannot write the segmentation ({exc.strerror or exc})") from None
        return time.perf_counter() - start

    workers = max(1, int(num_workers))
    bar = progress_bar(total=len(todo), desc="predict", unit="case", disable=not progress or not todo)
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medseg-read") as readers,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medseg-write") as writers,
    ):
        pending_reads: deque[tuple[Any, Path, Future]] = deque()
        pending_writes: deque[tuple[str, Future, CaseRecord, float]] = deque()
        queue = iter(todo)

        def refill() -> None:
            while len(pending_reads) < workers + 1:
                nxt = next(queue, None)
                if nxt is None:
                    return
                pending_reads.append((nxt[0], nxt[1], readers.submit(load, nxt[0])))

        def collect(block: bool) -> None:
            while pending_writes and (block or pending_writes[0][1].done() or len(pending_writes) > workers):
                case_id, fut, record, raw_write = pending_writes.popleft()
                try:
                    record.write_seconds = fut.result()
                    result.written.append(case_id)
                    result.records[case_id] = record
                    if clock.seconds_per_case is not None:
                        clock.write_done(raw_write, record.write_seconds)
                except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
                    result.failed[case_id] = case_error_message(exc)
                    logger.debug("writing %s failed", case_id, exc_info=True)
                bar.update()
                if case_id in result.written:
                    save_record()
                    maybe_fail("predict_written", case_id)

        refill()
        while pending_reads:
            case, target, fut = pending_reads.popleft()
            refill()
            try:
                prepared, load_seconds = fut.result()
                inferred, record, raw_write = infer(prepared, load_seconds)
            except Exception as exc:  # noqa: BLE001
                result.failed[case.case_id] = case_error_message(exc)
                logger.debug("predicting %s failed", case.case_id, exc_info=True)
                bar.update()
                continue
            pending_writes.append((case.case_id, writers.submit(finish, case, target, inferred), record, raw_write))
            collect(block=False)
        collect(block=True)
    bar.close()
    result.seconds = time.perf_counter() - t0
    for case_id, msg in result.failed.items():
        logger.error("%s: %s", case_id, msg)
    return result
