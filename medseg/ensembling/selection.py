"""Choosing an ensemble's members and postprocessing rules, from a work folder or a model bundle.

``medseg predict`` (and ``medseg export``) use, by default, the ensemble ``medseg find-best`` chose
(``WORK/best.json``) with the rules it fitted on it (``WORK/postprocessing.json``); without them every
trained fold of the plan's default configuration and architecture, with the rules the runs decided from
their training labels' component statistics (:mod:`medseg.postprocessing.prior`). The choice is made here;
inference loads the chosen runs (:func:`medseg.inference.members.load_member`) and applies the rules as the
callable it is handed (:class:`~medseg.postprocessing.operations.RulesPostprocess`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.inference.bundle import BundledFile, load_bundle
from medseg.inference.members import EnsembleMember, has_checkpoint, load_members
from medseg.inference.predictor import Predictor
from medseg.io.workdir import ALL, BundleLayout, RunDir, WorkDir, fold_name
from medseg.options import CheckpointName
from medseg.planning.plan import Plan
from medseg.planning.stage import Stage
from medseg.postprocessing.fit import describe_rules
from medseg.postprocessing.operations import RulesPostprocess, load_rules
from medseg.postprocessing.prior import describe_prior, ensemble_prior, is_prior

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSelection:
    """Which trained runs of a work folder (or bundle) to use, as ``medseg predict`` chooses them.

    ``configs`` / ``archs`` / ``folds`` None: find-best's choice, else every trained fold of the plan's
    default configuration and architecture; ``checkpoint``: ``final``, ``best`` or ``latest``;
    ``postprocessing``: use the rules find-best fitted on the chosen ensemble, else the rules decided from
    the training labels' component statistics (:mod:`medseg.postprocessing.prior`).
    """

    configs: Sequence[str] | None = None
    archs: Sequence[str] | None = None
    folds: Sequence[int | str] | None = None
    checkpoint: str = "final"
    postprocessing: bool = True


def postprocess_of(rules: dict[str, Any] | None) -> RulesPostprocess | None:
    """The callable a :class:`~medseg.inference.predictor.Predictor` applies for ``rules`` (None: none)."""
    return RulesPostprocess(rules) if rules else None


def work_dir_predictor(
    work_dir: str | Path,
    configs: Sequence[str] | None = None,
    archs: Sequence[str] | None = None,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "final",
    device: str = "cpu",
    postprocessing: bool = True,
    **kwargs: Any,
) -> Predictor:
    """The predictor of the ensemble to use for a work folder.

    Defaults (no ``configs``/``archs``): the configurations/architectures and folds ``medseg find-best``
    recorded in ``WORK/best.json``; without it, every trained fold of the plan's default configuration
    and architecture (``fold_all`` only when no numbered fold is trained). Given ``configs``/``archs``,
    every planned (configuration, architecture) pair. ``folds`` selects folds (``"all"`` = the
    ``fold_all`` run). ``checkpoint="snapshots"`` makes every snapshot of a chosen run (``train --snapshots``)
    a member. ``WORK/postprocessing.json`` is applied when
    ``postprocessing`` is True and it was fitted on exactly the chosen configurations/architectures;
    otherwise the rules the runs decided from their training labels' component statistics
    (``RUN/postprocessing_prior.json``, :mod:`medseg.postprocessing.prior`).
    A cascade configuration brings the predictor of its previous stage (every trained fold of it).
    Other keyword arguments go to :class:`~medseg.inference.predictor.Predictor`.

    Raises:
        MedsegError: no plan, nothing trained, or a requested run has no checkpoint.
    """
    run_dirs, rules = select_work_dir_runs(work_dir, configs, archs, folds, checkpoint, postprocessing)
    previous = {
        prev: Predictor(load_members(dirs, checkpoint), device=device, **kwargs)
        for prev, dirs in previous_stage_runs(work_dir, run_dirs, checkpoint).items()
    }
    members = load_members(run_dirs, checkpoint)
    if checkpoint == CheckpointName.SNAPSHOTS:
        logger.info("snapshot ensemble: %d members from %d run(s)", len(members), len(run_dirs))
    return Predictor(
        members,
        device=device,
        postprocess=postprocess_of(rules),
        previous_stages=previous,
        **kwargs,
    )


def bundle_ensemble(
    path: str | Path,
    configs: Sequence[str] | None = None,
    archs: Sequence[str] | None = None,
    folds: Sequence[int | str] | None = None,
    postprocessing: bool = True,
) -> tuple[list[EnsembleMember], dict[str, Any] | None]:
    """The ensemble members and postprocessing rules of a model bundle.

    Args:
        path: the zip written by ``medseg export``.
        configs / archs / folds: keep only these members (None: all); ``folds`` as ``[0, 1]`` or ``["all"]``.
        postprocessing: return the bundle's rules: find-best's when the kept members are the ensemble they
            were fitted on; rules decided from the training labels (:mod:`medseg.postprocessing.prior`) always.

    Returns:
        ``(members, rules or None)``; models on the CPU in eval mode.

    Raises:
        BundleError: the bundle is missing, not a zip, truncated or corrupt, misses a file, is of a newer
            format version, holds weights that do not fit their plan or invalid rules.
        MedsegError: the selection keeps no member.
    """
    members, stored = load_bundle(path, configs, archs, folds, postprocessing)
    rules = None
    if stored is not None:
        rules = _bundled_rules(stored)
        fitted = {tuple(p) for p in rules.get("fitted_on", {}).get("members", [])}
        if not is_prior(rules) and fitted != {(m.configuration, m.arch) for m in members}:
            logger.info(
                "%s: its postprocessing was fitted on %s, not on the chosen members; not applied", path, sorted(fitted)
            )
            rules = None
        else:
            logger.info(
                "postprocessing: %s (%s, from the bundle)",
                describe_rules(rules),
                "decided from the training labels" if is_prior(rules) else "fitted by find-best",
            )
    return members, rules


def bundle_predictor(
    path: str | Path,
    configs: Sequence[str] | None = None,
    archs: Sequence[str] | None = None,
    folds: Sequence[int | str] | None = None,
    device: str = "cpu",
    postprocessing: bool = True,
    **kwargs: Any,
) -> Predictor:
    """The predictor of a model bundle's ensemble (:func:`bundle_ensemble`); the same labels as
    :func:`work_dir_predictor` on the work folder it was exported from. Other keyword arguments go to
    :class:`~medseg.inference.predictor.Predictor`.

    Raises:
        BundleError: the bundle is missing, truncated, corrupt, incomplete or of a newer format.
    """
    members, rules = bundle_ensemble(path, configs, archs, folds, postprocessing)
    return Predictor(members, device=device, postprocess=postprocess_of(rules), **kwargs)


def _bundled_rules(stored: BundledFile) -> dict[str, Any]:
    """Rules checked as :func:`medseg.postprocessing.operations.load_rules` checks a file."""
    with tempfile.TemporaryDirectory(prefix="medseg_bundle_") as tmp:
        file = Path(tmp) / BundleLayout.POSTPROCESSING
        file.write_bytes(stored.data)
        try:
            return load_rules(file)
        except MedsegError as exc:
            raise stored.error(f"is invalid ({str(exc).removeprefix(f'{file}: ')})") from None


def select_work_dir_runs(
    work_dir: str | Path,
    configs: Sequence[str] | None,
    archs: Sequence[str] | None,
    folds: Sequence[int | str] | None,
    checkpoint: str,
    postprocessing: bool,
) -> tuple[list[Path], dict[str, Any] | None]:
    """The run folders and postprocessing rules of a work folder's ensemble.

    The choice of :func:`work_dir_predictor` (which see for the defaults).

    Args:
        work_dir: the work folder (``plans.json``, ``runs/``, optionally ``best.json`` and
            ``postprocessing.json``).
        configs: configurations to use; None: find-best's choice, else the plan's default.
        archs: architectures to use; None: find-best's choice, else each configuration's default.
        folds: folds to use (``"all"`` = the ``fold_all`` run); None: find-best's folds, else every
            trained numbered fold.
        checkpoint: ``final``, ``best``, ``latest`` or ``snapshots`` (runs with at least one snapshot).
        postprocessing: use ``postprocessing.json`` when it was fitted on the chosen ensemble, else the
            runs' rules decided from the training labels (:func:`medseg.postprocessing.prior.ensemble_prior`);
            False: none.

    Returns:
        ``(run folders, postprocessing rules or None)``.

    Raises:
        MedsegError: no plan, nothing trained, or a requested run has no checkpoint.
    """
    work_dir = Path(work_dir)
    wd = WorkDir(work_dir)
    plan = Plan.load(wd.plans)
    best = _read_best(work_dir)
    if best is not None and configs is None and archs is None:
        pairs = [(m["configuration"], m["arch"]) for m in best["members"]]
        folds = folds if folds is not None else best.get("folds")
        logger.info("using the ensemble find-best chose: %s", ", ".join(f"{c}/{a}" for c, a in pairs))
    else:
        pairs = []
        for c in configs or [plan.default_configuration]:
            for a in archs or [plan.configuration(c).default_arch]:
                stage = Stage.resolve(plan, c, a)  # clear error when not planned
                pairs.append((stage.config_name, stage.arch))
    run_dirs: list[Path] = []
    for c, a in pairs:
        trained = {name: run.path for name, run in wd.fold_runs(c, a).items() if has_checkpoint(run.path, checkpoint)}
        if folds is not None:
            wanted = [fold_name(f) for f in folds]
            missing = [w for w in wanted if w not in trained]
            if missing:
                raise MedsegError(
                    f"{wd.arch_runs(c, a)}: no {_checkpoint_label(checkpoint)} for {', '.join(missing)}"
                    f" (trained: {sorted(trained) or 'none'}); train it with `medseg train {work_dir} "
                    f"--config {c} --arch {a} --fold N`"
                )
            chosen = [trained[w] for w in wanted]
        else:
            every = fold_name(ALL)
            chosen = [d for name, d in sorted(trained.items()) if name != every] or (
                [trained[every]] if every in trained else []
            )
        if not chosen:
            raise MedsegError(
                f"{wd.arch_runs(c, a)}: no trained model (no fold folder holds {_checkpoint_label(checkpoint)}); "
                f"train one with `medseg train {work_dir} --config {c} --arch {a} --fold 0`"
            )
        run_dirs.extend(chosen)
    rules = None
    pp_path = wd.postprocessing
    if postprocessing and pp_path.is_file():
        candidate = load_rules(pp_path)
        fitted = {tuple(m) for m in candidate.get("fitted_on", {}).get("members", [])}
        if fitted == set(pairs):
            rules = candidate
            logger.info("postprocessing: %s (fitted by find-best, %s)", describe_rules(rules), pp_path)
        else:
            logger.info(
                "%s was fitted on %s, not on the chosen ensemble; not applied",
                pp_path,
                sorted(fitted) or "an unknown ensemble",
            )
    if postprocessing and rules is None:  # no cross-validation evidence: the reference labels' topology
        rules, source = ensemble_prior(work_dir, run_dirs, region_based=plan.is_region_based)
        logger.info("postprocessing: %s (from the %s)", describe_prior(rules) if rules else "none", source)
    logger.info("ensemble of %d network(s): %s", len(run_dirs), ", ".join(wd.run_label(d) for d in run_dirs))
    return run_dirs, rules


def _checkpoint_label(checkpoint: str) -> str:
    """The file(s) ``checkpoint`` names, for messages: ``checkpoint_final.pt``, or the snapshots' pattern."""
    if checkpoint == CheckpointName.SNAPSHOTS:
        return f"{RunDir.checkpoint_file(RunDir.snapshot_name(1))}, ... (train with --snapshots N)"
    return RunDir.checkpoint_file(checkpoint)


def previous_stage_runs(work_dir: str | Path, run_dirs: Sequence[Path], checkpoint: str) -> dict[str, list[Path]]:
    """The previous stages the cascades among ``run_dirs`` need: previous-stage configuration -> its run folders.

    A cascade (``3d_cascade_fullres``) predicts from the segmentation of its previous stage (``3d_lowres``),
    made by every trained fold of that configuration with the cascade members' architectures.

    Raises:
        MedsegError: a previous stage has no trained fold.
    """
    work_dir = Path(work_dir)
    plan = Plan.load(WorkDir(work_dir).plans)
    wanted: dict[str, list[str]] = {}
    for d in run_dirs:
        config, arch = RunDir(d).configuration, RunDir(d).arch
        prev = plan.configurations[config].previous_stage if config in plan.configurations else None
        if prev is not None and arch not in wanted.setdefault(prev, []):
            wanted[prev].append(arch)
    return {
        prev: select_work_dir_runs(work_dir, [prev], archs, None, checkpoint, False)[0]
        for prev, archs in wanted.items()
    }


def _read_best(work_dir: Path) -> dict[str, Any] | None:
    path = WorkDir(work_dir).best
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
        if not best.get("members"):
            raise ValueError("no members")
        return best
    except (ValueError, AttributeError) as exc:
        raise MedsegError(f"{path}: unreadable find-best result ({exc}); re-run `medseg find-best`") from None
