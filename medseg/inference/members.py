"""Ensemble members: trained networks rebuilt from their run folders, and the runs a work folder's ensemble uses.

A run folder ``WORK/runs/<config>/<arch>/fold_<k>`` holds ``checkpoint_{final,best,latest}.pt``; each
checkpoint stores the plan, configuration and architecture it was trained with, so the folder alone is
enough to rebuild the network (:func:`load_member`). :func:`select_work_dir_runs` picks the run folders
(and the postprocessing rules) that make up the ensemble of a whole work folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medseg.errors import CheckpointError, MedsegError
from medseg.io.checkpoint import load_checkpoint
from medseg.io.workdir import ALL, RunDir, WorkDir, fold_name
from medseg.options import CheckpointName, choices
from medseg.planning.plan import Plan
from medseg.postprocessing.fit import describe_rules
from medseg.postprocessing.operations import load_rules
from medseg.postprocessing.prior import describe_prior, ensemble_prior

logger = logging.getLogger(__name__)

CHECKPOINT_NAMES: tuple[str, ...] = tuple(choices(CheckpointName))


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


@dataclass
class EnsembleMember:
    """One trained network of an ensemble.

    Attributes:
        model: the network; ``forward((B, C, *patch)) -> logits (B, K, *patch)`` in eval mode.
        plan: the plan it was trained with (its ``label_ids`` and preprocessing are used).
        configuration: configuration name (selects the preprocessing and the patch size).
        arch: architecture name.
        source: where it came from (checkpoint path), for messages.
    """

    model: torch.nn.Module
    plan: Plan
    configuration: str
    arch: str
    source: str = ""


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_member(run_dir: str | Path, checkpoint: str = "final") -> EnsembleMember:
    """Rebuild one trained network from its run folder (the folder alone is enough).

    Args:
        run_dir: ``WORK/runs/<config>/<arch>/fold_<k>``.
        checkpoint: ``final``, ``best`` or ``latest``.

    Returns:
        The member, model on the CPU in eval mode.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, or its weights do not fit the network
            the recorded plan describes.
    """
    if checkpoint not in CHECKPOINT_NAMES:
        raise CheckpointError(f"checkpoint must be one of {list(CHECKPOINT_NAMES)}, got {checkpoint!r}")
    run_dir = Path(run_dir)
    path = RunDir(run_dir).checkpoint(checkpoint)
    if not path.is_file():
        present = RunDir(run_dir).checkpoints_present()
        hint = f"; present: {present}" if present else ""
        raise CheckpointError(f"{path}: checkpoint not found{hint}")
    ckpt = load_checkpoint(path)
    try:
        plan = Plan.from_dict(ckpt["plan"])
        configuration = str(ckpt["configuration"])
        arch = str(ckpt["arch"])
        state = ckpt["model"]
    except KeyError as exc:
        raise CheckpointError(f"{path}: checkpoint lacks the key {exc}; not a medseg checkpoint") from None
    except MedsegError as exc:
        raise CheckpointError(f"{path}: the plan stored in the checkpoint is invalid: {exc}") from None
    _check_belongs_to_run(path, run_dir, plan, configuration, arch)
    net = plan.configuration(configuration).network(arch)
    model = net.build(plan.network_in_channels(configuration), plan.num_classes)
    try:
        model.load_state_dict(_strip_prefixes(state))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit the {arch} network of its plan ({first})") from None
    model.eval()
    return EnsembleMember(model=model, plan=plan, configuration=configuration, arch=arch, source=str(path))


#: Plan fields that identify the dataset a network was trained on.
_DATASET_FIELDS = ("dataset_name", "channel_names", "label_ids", "label_names")


def _check_belongs_to_run(path: Path, run_dir: Path, plan: Plan, configuration: str, arch: str) -> None:
    """Refuse a checkpoint copied in from another run: it would predict with a plan this folder does not hold.

    Compares the checkpoint's configuration/architecture with the run folder's place
    (``runs/<configuration>/<arch>/fold_<k>``), and its dataset (name, channels, labels) and preprocessing
    (:func:`~medseg.preprocessing.case.preprocessing_fingerprint`) with the run folder's ``plans.json``,
    where these exist.

    Raises:
        CheckpointError: naming what differs.
    """
    from medseg.preprocessing.case import preprocessing_fingerprint

    diffs = []
    run = RunDir(run_dir)
    if run.in_runs_folder and (run.configuration, run.arch) != (configuration, arch):
        diffs.append(f"it is a {configuration}/{arch} network, the folder is {run.configuration}/{run.arch}")
    run_plan_path = run.plans
    if run_plan_path.is_file():
        run_plan = Plan.load(run_plan_path)
        diffs += [f"{k} {getattr(plan, k)!r} vs {getattr(run_plan, k)!r}" for k in _DATASET_FIELDS
                  if getattr(plan, k) != getattr(run_plan, k)]
        if not diffs and configuration in run_plan.configurations and preprocessing_fingerprint(
                plan, configuration) != preprocessing_fingerprint(run_plan, configuration):
            diffs.append(f"the preprocessing (spacing, normalisation) of {configuration}")
    if diffs:
        raise CheckpointError(
            f"{path}: belongs to another plan than its run folder {run_dir} ({'; '.join(diffs)}); it was "
            "copied from another run or dataset: put this run's checkpoint back or train the run again")


def select_work_dir_runs(
    work_dir: str | Path,
    configs: Sequence[str] | None,
    archs: Sequence[str] | None,
    folds: Sequence[int | str] | None,
    checkpoint: str,
    postprocessing: bool,
) -> tuple[list[Path], dict[str, Any] | None]:
    """The run folders and postprocessing rules of a work folder's ensemble.

    The choice of :meth:`medseg.inference.Predictor.from_work_dir` (which see for the defaults).

    Args:
        work_dir: the work folder (``plans.json``, ``runs/``, optionally ``best.json`` and
            ``postprocessing.json``).
        configs: configurations to use; None: find-best's choice, else the plan's default.
        archs: architectures to use; None: find-best's choice, else each configuration's default.
        folds: folds to use (``"all"`` = the ``fold_all`` run); None: find-best's folds, else every
            trained numbered fold.
        checkpoint: ``final``, ``best`` or ``latest``.
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
            cfg = plan.configuration(c)
            for a in archs or [cfg.default_arch]:
                cfg.network(a)  # clear error when the architecture is not planned
                pairs.append((c, a))
    run_dirs: list[Path] = []
    for c, a in pairs:
        trained = {name: run.path for name, run in wd.fold_runs(c, a).items() if run.checkpoint(checkpoint).is_file()}
        if folds is not None:
            wanted = [fold_name(f) for f in folds]
            missing = [w for w in wanted if w not in trained]
            if missing:
                raise MedsegError(
                    f"{wd.arch_runs(c, a)}: no {RunDir.checkpoint_file(checkpoint)} for {', '.join(missing)}"
                    f" (trained: {sorted(trained) or 'none'}); train it with `medseg train {work_dir} "
                    f"--config {c} --arch {a} --fold N`"
                )
            chosen = [trained[w] for w in wanted]
        else:
            every = fold_name(ALL)
            chosen = [d for name, d in sorted(trained.items()) if name != every] or (
                [trained[every]] if every in trained else [])
        if not chosen:
            raise MedsegError(
                f"{wd.arch_runs(c, a)}: no trained model (no fold folder holds {RunDir.checkpoint_file(checkpoint)}); "
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
            logger.info("%s was fitted on %s, not on the chosen ensemble; not applied", pp_path,
                        sorted(fitted) or "an unknown ensemble")
    if postprocessing and rules is None:  # no cross-validation evidence: the reference labels' topology
        rules, source = ensemble_prior(work_dir, run_dirs, region_based=plan.is_region_based)
        logger.info("postprocessing: %s (from the %s)", describe_prior(rules) if rules else "none", source)
    logger.info("ensemble of %d network(s): %s", len(run_dirs), ", ".join(
        wd.run_label(d) for d in run_dirs))
    return run_dirs, rules


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
    return {prev: select_work_dir_runs(work_dir, [prev], archs, None, checkpoint, False)[0]
            for prev, archs in wanted.items()}


def refuse_cascades(plan: Plan, configurations: Sequence[str], what: str) -> None:
    """Refuse ``what`` (e.g. ``"a model bundle"``) for cascade configurations, whose networks need their
    previous stage's segmentation as input.

    Raises:
        ConfigError: naming the cascades and what to do instead.
    """
    from medseg.errors import ConfigError

    cascades = sorted({c for c in configurations if plan.configuration(c).previous_stage is not None})
    if cascades:
        prev = plan.configuration(cascades[0]).previous_stage
        raise ConfigError(
            f"{what} of the cascade {', '.join(cascades)} is not supported: its networks take the {prev} "
            f"segmentation as input channels. Choose other configurations (--config 3d_fullres {prev}), or predict "
            f"with the cascade from the work folder (`medseg predict -m WORK --config {cascades[0]}`)")


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
