"""``medseg export``: a work folder's ensemble as a model bundle, or its networks as ONNX / TorchScript.

Which networks and which postprocessing rules is the choice ``medseg predict`` makes
(:mod:`medseg.ensembling.selection`: find-best's by default); the files are written by inference
(:func:`medseg.inference.bundle.write_bundle`, :func:`medseg.inference.network_export.write_networks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.ensembling.model_card import model_card
from medseg.ensembling.selection import RunSelection, bundle_ensemble, select_work_dir_runs
from medseg.errors import ConfigError
from medseg.fingerprint import Fingerprint
from medseg.inference.bundle import read_manifest, select_entries, write_bundle
from medseg.inference.input_guard import TrainingRange
from medseg.inference.members import EnsembleMember, load_member, refuse_cascades
from medseg.inference.network_export import NetworkFormat, check_format, write_networks
from medseg.io.workdir import RunDir, WorkDir
from medseg.planning.plan import Plan
from medseg.postprocessing.quality_reference import with_reference_quality


def export_bundle(
    work_dir: str | Path,
    output: str | Path,
    selection: RunSelection | None = None,
) -> Path:
    """Write the ensemble of a work folder to one zip, atomically (temporary file, fsync, rename).

    The bundle (:mod:`medseg.inference.bundle`) carries ``postprocessing.json`` when find-best's rules were
    fitted on the chosen ensemble, else the runs' rules from their labels' component statistics (rules without
    find-best's quality fit get the heuristic quality model with the training volumes,
    :func:`~medseg.postprocessing.quality_reference.reference_quality_model`, as ``medseg predict`` builds it
    for a work folder), ``best.json`` when the work folder has one, the training data's range for the input guard
    (``training_range.json``, from ``fingerprint.json``) and the model card (``MODEL_CARD.md``,
    :mod:`medseg.ensembling.model_card`).

    Args:
        work_dir: the work folder (``plans.json``, ``runs/``, optionally ``best.json``, ``postprocessing.json``).
        output: the zip to write (replaced when it exists).
        selection: which runs, as for ``medseg predict`` (:class:`~medseg.ensembling.selection.RunSelection`;
            default: find-best's choice, final checkpoints, with ``postprocessing.json`` when it was
            fitted on the chosen ensemble).

    Returns:
        ``output``.

    Raises:
        MedsegError: nothing trained, a requested run or checkpoint is missing or does not fit its plan,
            or ``output`` is a folder; the selection holds a cascade (its previous stage is not bundled).
        OSError: the file system refused the write; ``output`` is left as it was.
    """
    work_dir, output = Path(work_dir), Path(output)
    if work_dir.is_file():
        raise ConfigError(f"{work_dir}: is a file, not a work folder (a bundle is exported already)")
    if output.is_dir():
        raise ConfigError(f"{output}: is a folder; give the zip file to write, e.g. {output / 'model.zip'}")
    sel = selection or RunSelection()
    run_dirs, rules = select_work_dir_runs(
        work_dir, sel.configs, sel.archs, sel.folds, sel.checkpoint, sel.postprocessing
    )
    wd = WorkDir(work_dir)
    plan = Plan.load(wd.plans)
    refuse_cascades(plan, [RunDir(d).configuration for d in run_dirs], "a model bundle")
    rules = _with_quality(rules, work_dir, plan)
    best = wd.best.read_bytes() if wd.best.is_file() else None
    training_range = (
        TrainingRange.from_fingerprint(Fingerprint.load(wd.fingerprint)) if wd.fingerprint.is_file() else None
    )
    card = model_card(work_dir, members=[wd.run_label(d) for d in run_dirs])
    return write_bundle(output, run_dirs, sel.checkpoint, rules, best, training_range, card)


def export_networks(
    source: str | Path,
    output_dir: str | Path,
    fmt: NetworkFormat,
    selection: RunSelection | None = None,
) -> Path:
    """Write every network of an ensemble in ``fmt`` plus ``inference.json`` into ``output_dir``
    (:func:`medseg.inference.network_export.write_networks`).

    Args:
        source: a work folder, or a model bundle (``.zip`` from ``medseg export``).
        output_dir: folder to write into (created; files of the same names are replaced).
        fmt: ``onnx`` or ``torchscript``.
        selection: which networks, as for ``medseg predict`` (:class:`~medseg.ensembling.selection.RunSelection`;
            its ``postprocessing`` records the rules fitted on this ensemble).

    Returns:
        The path of ``inference.json``.

    Raises:
        ConfigError: unknown format, or ONNX export without the ``onnx`` package.
        MedsegError: nothing trained / no such run, or a network that cannot be exported (naming the
            architecture and why) or whose export does not reproduce its logits.
    """
    check_format(fmt)
    members, folds_of, rules = _members(Path(source), selection or RunSelection())
    refuse_cascades(members[0].plan, [m.configuration for m in members], f"{fmt} export")
    return write_networks(members, folds_of, rules, output_dir, fmt)


def _members(source: Path, sel: RunSelection) -> tuple[list[EnsembleMember], list[str], dict[str, Any] | None]:
    """The members (with their fold names) and rules of a work folder or a bundle."""
    configs, archs, folds, checkpoint, postprocessing = (
        sel.configs,
        sel.archs,
        sel.folds,
        sel.checkpoint,
        sel.postprocessing,
    )
    if source.is_file():
        chosen = select_entries(read_manifest(source), configs, archs, folds, source)
        members, rules = bundle_ensemble(source, configs, archs, folds, postprocessing)
        return members, [m["fold"] for m in chosen], rules
    run_dirs, rules = select_work_dir_runs(source, configs, archs, folds, checkpoint, postprocessing)
    rules = _with_quality(rules, source, Plan.load(WorkDir(source).plans))
    return [load_member(d, checkpoint) for d in run_dirs], [d.name for d in run_dirs], rules


def _with_quality(rules: dict[str, Any] | None, work_dir: Path, plan: Plan) -> dict[str, Any] | None:
    """``rules`` with the heuristic quality model and the training volumes where find-best fitted none (the
    volume rules travel with every export, as ``medseg predict`` builds them for a work folder)."""
    return None if rules is None else with_reference_quality(rules, work_dir, plan.label_ids)
