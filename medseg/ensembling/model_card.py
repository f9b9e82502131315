"""The model card: what a trained model is, what it was trained on, how well it did, and where not to trust it.

:func:`model_card` writes Markdown from a work folder's files (``fingerprint.json``, ``plans.json``, the runs'
``config.json`` / ``progress.json`` / ``validation/metrics.json``, ``best.json``); ``medseg export`` puts it
into the bundle as ``MODEL_CARD.md`` and ``medseg card WORK`` prints it. The text depends only on those
files (no clock, no machine), so the same work folder always gives the same card.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg import __version__
from medseg.fingerprint import Fingerprint
from medseg.inference.input_guard import INTENSITY_MARGIN, SPACING_FACTOR, TrainingRange, channel_modality
from medseg.io.workdir import RunDir, WorkDir
from medseg.planning.plan import Plan

logger = logging.getLogger(__name__)

__all__ = ["LOW_DICE", "FEW_CASES", "model_card"]

#: a class whose mean cross-validation Dice is below this is listed under "Known limits"
LOW_DICE = 0.7
#: a dataset with fewer training cases than this is listed under "Known limits"
FEW_CASES = 30
#: keys of ``postprocessing.json`` that hold find-best's calibration and quality-score fit
#: (:mod:`medseg.ensembling.quality_fit`)
_FIT_KEYS = ("calibration", "quality")


def _read_json(path: Path) -> Any:
    """The parsed JSON at ``path``, or None when it is missing or unreadable (the card then says so)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _num(values: Sequence[float] | np.ndarray, digits: int = 3) -> str:
    return " x ".join(f"{float(v):.{digits}g}" for v in values)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _dataset_section(fp: Fingerprint, plan: Plan) -> tuple[list[str], list[str]]:
    """The dataset section and the limits it reveals."""
    spacings, shapes = fp.spacings(), np.array([c.shape for c in fp.cases], dtype=np.float64)
    modalities = [f"{n} ({channel_modality(n)})" for n in fp.channel_names]
    out = [
        "## Dataset",
        "",
        f"- name: {fp.dataset_name}; {fp.num_cases} training cases",
        f"- channels: {', '.join(modalities)}",
        f"- spacing (mm, Z x Y x X): median {_num(np.median(spacings, axis=0))}, "
        f"range {_num(spacings.min(axis=0))} .. {_num(spacings.max(axis=0))}",
        f"- size (voxels): median {_num(np.median(shapes, axis=0))}, "
        f"range {_num(shapes.min(axis=0))} .. {_num(shapes.max(axis=0))}",
        "",
    ]
    names = dict(zip(plan.label_ids, plan.label_names))
    rows, limits = [], []
    for label in fp.label_ids[1:]:
        counts = [c.class_voxel_counts.get(label, 0) for c in fp.cases]
        present = sum(1 for n in counts if n > 0)
        components = [len(c.class_component_sizes.get(label, ())) for c in fp.cases if c.class_voxel_counts.get(label)]
        median_voxels = int(np.median([n for n in counts if n > 0])) if present else 0
        median_parts = f"{np.median(components):g}" if components else "-"
        rows.append([label, names.get(label, "?"), f"{present}/{fp.num_cases}", median_voxels, median_parts])
        if present < 0.5 * fp.num_cases:
            limits.append(
                f"class {label} ({names.get(label, '?')}) is present in only {present} of {fp.num_cases} cases"
            )
    out += _table(["id", "class", "cases present", "median voxels", "median components"], rows)
    if fp.num_cases < FEW_CASES:
        limits.insert(
            0, f"only {fp.num_cases} training cases (fewer than {FEW_CASES}): expect a wide spread on new data"
        )
    return out + [""], limits


def _plan_section(plan: Plan) -> list[str]:
    rows = []
    for name, cfg in plan.configurations.items():
        norm = ", ".join(str(n.scheme) for n in cfg.normalization)
        for arch, net in cfg.networks.items():
            rows.append([name, f"{cfg.dims}D", _num(cfg.spacing), arch, _num(net.patch_size, 4), net.batch_size, norm])
    return [
        "## Plan",
        "",
        f"default configuration: {plan.default_configuration}",
        "",
        *_table(["configuration", "dims", "spacing (mm)", "network", "patch", "batch", "normalisation"], rows),
        "",
    ]


def _runs(wd: WorkDir) -> list[RunDir]:
    return [run for config, arch in wd.run_pairs() for run in wd.fold_runs(config, arch).values()]


def _training_section(runs: list[RunDir]) -> list[str]:
    rows = []
    for run in runs:
        progress, config = _read_json(run.progress) or {}, _read_json(run.config) or {}
        seconds = progress.get("elapsed_seconds")
        rows.append(
            [
                f"{run.configuration}/{run.arch}/{run.fold_name}",
                progress.get("status", "?"),
                f"{progress.get('epoch', '?')}/{progress.get('max_epochs', '?')}",
                progress.get("iteration", "?"),
                f"{seconds / 60:.1f} min" if isinstance(seconds, (int, float)) else "?",
                config.get("device", "?"),
                progress.get("precision", "?"),
            ]
        )
    if not rows:
        return ["## Training", "", "no trained runs", ""]
    return [
        "## Training",
        "",
        f"card written by medseg {__version__} (the runs do not record the version that trained them)",
        "",
        *_table(["run", "status", "epochs", "iterations", "time", "device", "precision"], rows),
        "",
    ]


def _label_order(label: str) -> tuple[int, int, str]:
    """Label ids in numeric order, then region keys (``"(1, 2, 3)"``, region-based plans) as written."""
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def _cv_section(runs: list[RunDir], plan: Plan, best: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """Per (configuration, network) and class: Dice over every validation case of every fold."""
    names = dict(zip((str(i) for i in plan.label_ids), plan.label_names))
    pooled: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        metrics = _read_json(run.validation_metrics) or {}
        for case in (metrics.get("per_case") or {}).values():
            for label, value in case.items():
                if isinstance(value, (int, float)):
                    pooled.setdefault(f"{run.configuration}/{run.arch}", {}).setdefault(label, []).append(float(value))
    out, limits = ["## Cross-validation", ""], []
    if not pooled:
        out += ["no validation results (train with final validation, then run `medseg find-best`)", ""]
    rows = []
    for candidate, per_label in pooled.items():
        for label in sorted(per_label, key=_label_order):
            v = np.array(per_label[label])
            rows.append(
                [
                    candidate,
                    f"{label} {names.get(label, 'region' if label.startswith('(') else '?')}",
                    v.size,
                    f"{v.mean():.3f}",
                    f"{v.std():.3f}",
                    f"{v.min():.3f}",
                    f"{np.median(v):.3f}",
                ]
            )
            if v.mean() < LOW_DICE:
                limits.append(
                    f"{candidate}: class {label} ({names.get(label, '?')}) has a mean cross-validation Dice of "
                    f"{v.mean():.2f} (below {LOW_DICE})"
                )
    if rows:
        out += _table(["candidate", "class", "cases", "mean Dice", "std", "min", "median"], rows) + [""]
    if best:
        members = " + ".join(f"{m['configuration']}/{m['arch']}" for m in best.get("members", []))
        out += [
            f"find-best chose {members} (folds {best.get('folds')}): mean foreground Dice "
            f"{best.get('score', float('nan')):.4f} over {best.get('num_cases')} cases, "
            f"{best.get('score_postprocessed', float('nan')):.4f} after postprocessing "
            f"({best.get('postprocessing_summary', 'none')})",
            "",
        ]
    return out, limits


def _fit_section(rules: dict[str, Any] | None) -> list[str]:
    fits = {k: rules[k] for k in _FIT_KEYS if rules and k in rules}
    out = ["## Calibration and quality score", ""]
    if not fits:
        return out + [
            "no calibration or quality-score fit (run `medseg find-best` after cross-validation): predictions use "
            "temperature 1 and quality.json's score is the plain expected Dice",
            "",
        ]
    for key, value in fits.items():
        out.append(f"- {key}: `{json.dumps(value, sort_keys=True)}`")
    return out + [""]


def _range_section(tr: TrainingRange | None) -> tuple[list[str], list[str]]:
    out = ["## Intended input range", ""]
    if tr is None:
        return out + ["no training range recorded (no fingerprint.json); prediction checks only the spacing", ""], []
    out += [
        "`medseg predict` warns (one line per case, also in quality.json) outside this range; it never refuses:",
        "",
        f"- modality: {', '.join(f'{n} ({m})' for n, m in zip(tr.channel_names, tr.modalities))}",
        f"- spacing (mm): {_num(tr.spacing_min)} .. {_num(tr.spacing_max)} (warns beyond {SPACING_FACTOR:g}x)",
    ]
    if tr.extent_min:
        out.append(
            f"- physical size (mm): {_num(tr.extent_min)} .. {_num(tr.extent_max)} (warns beyond {SPACING_FACTOR:g}x)"
        )
    for c, (lo, hi) in enumerate(zip(tr.percentiles_min, tr.percentiles_max)):
        out.append(
            f"- channel {c} whole-image 0.5/50/99.5th percentiles: {_num(lo)} .. {_num(hi)} "
            f"(warns beyond {INTENSITY_MARGIN:g}x the range's width)"
        )
    if tr.orientations:
        out.append(f"- orientation (axis codes): {', '.join(tr.orientations)}")
    limits = (
        []
        if tr.percentiles_min
        else ["the fingerprint predates per-case intensity percentiles: re-run `medseg plan` for the intensity check"]
    )
    return out + [""], limits


def model_card(work_dir: str | Path, members: Sequence[str] | None = None) -> str:
    """The model card of a work folder, as Markdown.

    Args:
        work_dir: the work folder (``plans.json``; ``fingerprint.json``, runs and ``best.json`` when present).
        members: the runs a bundle holds (``config/arch/fold_k``), listed under the title; None for a work folder.

    Returns:
        the card's text (ends with a newline).

    Raises:
        MedsegError: no readable ``plans.json``.
    """
    wd = WorkDir(work_dir)
    plan = Plan.load(wd.plans)
    best = _read_json(wd.best)
    fp = Fingerprint.load(wd.fingerprint) if wd.fingerprint.is_file() else None
    runs = _runs(wd)
    lines = [f"# Model card: {plan.dataset_name}", ""]
    if members is not None:
        lines += [f"bundle networks: {', '.join(members)}", ""]
    limits: list[str] = []
    if fp is not None:
        section, found = _dataset_section(fp, plan)
        lines += section
        limits += found
    else:
        lines += ["## Dataset", "", "no fingerprint.json in the work folder", ""]
    lines += _plan_section(plan) + _training_section(runs)
    section, found = _cv_section(runs, plan, best if isinstance(best, dict) else None)
    rules = _read_json(wd.postprocessing)
    lines += section + _fit_section(rules if isinstance(rules, dict) else None)
    limits += found
    section, found = _range_section(TrainingRange.from_fingerprint(fp) if fp is not None else None)
    lines += section
    limits += found
    limits.append("trained and validated on one dataset; other scanners, protocols or populations are untested")
    lines += ["## Known limits", "", *[f"- {item}" for item in limits], ""]
    return "\n".join(lines)
