"""Helpers of ``scripts/bench_techniques.py``: commands and their cache, ensemble-rule scores, the table.

The table's columns: technique, iterations, training seconds, the fold's validation Dice (for derived rows
find-best's cross-validation score on the same cases), held-out Dice (``medseg predict`` with its defaults:
postprocessed) and the raw held-out Dice (argmax of the mean probabilities, no postprocessing), HD95,
prediction seconds, total compute (training + prediction seconds) and the difference to the plain arm.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medseg.ensembling.combine import Case, combine, cross_validated_scores, fit_stacker, fit_weights
from medseg.evaluation.metrics import dice_from_counts, overlap_counts
from medseg.io.image import read_image, strip_suffix
from medseg.io.workdir import RunDir, WorkDir

RULES = ("mean", "weighted", "vote", "stacking")
#: A difference below this needs a second seed (the issue's rule).
SEED_THRESHOLD = 0.005


def medseg_cmd(*args: str) -> list[str]:
    """``python -m medseg ARGS`` with this interpreter."""
    return [sys.executable, "-m", "medseg", *args]


def show(cmd: Sequence[str]) -> str:
    """A command as the table prints it (``medseg ...``)."""
    words = list(cmd)
    if words[:3] == [sys.executable, "-m", "medseg"]:
        words = ["medseg", *words[3:]]
    return shlex.join(words)


class Runner:
    """Runs (or, dry, only records) the commands; each step's JSON result cached under ``out``."""

    def __init__(self, out: Path, threads: int, dry: bool) -> None:
        self.out, self.dry, self.commands = out, dry, []
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def step(
        self,
        name: str,
        cmds: Sequence[Sequence[str]],
        body: Callable[[], dict[str, Any]],
        prepare: Callable[[], None] | None = None,
    ) -> dict[str, Any] | None:
        """The cached result of step ``name``, else ``prepare``, its commands (timed: ``seconds`` per command),
        then ``body`` (its result, stored)."""
        self.commands += [show(c) for c in cmds]
        cache = self.out / f"{name}.json"
        if cache.is_file():
            return dict(json.loads(cache.read_text()))
        if self.dry:
            print(f"{name}: " + ("would run:\n  " + "\n  ".join(show(c) for c in cmds) if cmds else "not computed yet"))
            return None
        if prepare is not None:
            prepare()
        seconds = []
        for cmd in cmds:
            t = time.perf_counter()
            subprocess.run(cmd, check=True, env=self.env)
            seconds.append(round(time.perf_counter() - t, 1))
        result = {**body(), "seconds": seconds, "commands": [show(c) for c in cmds]}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(cache)
        return result


def arm_run(work: Path, fold: int | str) -> Path | None:
    """The fold-``fold`` run folder of a work folder (its first configuration/architecture), or None."""
    wd = WorkDir(work)
    for config, arch in wd.run_pairs():
        if wd.run(config, arch, fold).path.is_dir():
            return wd.run(config, arch, fold).path
    return None


def fold_dice(work: Path, fold: int | str) -> float | None:
    """Mean foreground Dice of the run's final validation (its ``validation/metrics.json``), None without one."""
    run = arm_run(work, fold)
    metrics = None if run is None else RunDir(run).validation_metrics
    if metrics is None or not metrics.is_file():
        return None
    value = json.loads(metrics.read_text()).get("mean_foreground_dice")
    return None if value is None else float(value)


def load_probs(npz: Path) -> np.ndarray:
    """``probabilities`` ``(K, Z, Y, X)`` float32 of a validation or ``--save-probabilities`` file."""
    with np.load(npz) as f:
        return f["probabilities"].astype(np.float32)


def mean_fg_dice(labels: np.ndarray, ref: np.ndarray, k: int) -> float:
    """Mean foreground Dice of class-index maps (both empty: 1), as find-best scores a case."""
    return float(dice_from_counts(overlap_counts(labels, ref, k))[1:].mean())


def rule_scores(val: Sequence[Case], test: Sequence[Case]) -> dict[str, dict[str, float]]:
    """Each rule's mean foreground Dice: ``cv`` on ``val`` (fitted rules cross-fitted on its two halves,
    alternate cases) and ``heldout`` on ``test`` (fitted on all of ``val``).

    Args:
        val / test: ``(members' probabilities (M, K, *spatial), class-index labels (*spatial))`` per case.
    """
    k = val[0][0].shape[1]

    def score(labels: np.ndarray, ref: np.ndarray) -> float:
        return mean_fg_dice(labels, ref, k)

    cv = cross_validated_scores({0: list(val[0::2]), 1: list(val[1::2])}, score)
    weights, stacker = fit_weights(val), fit_stacker(val)
    heldout = {
        r: float(np.mean([score(combine(r, p, weights=weights, stacker=stacker), ref) for p, ref in test]))
        for r in RULES
    }
    return {
        "cv": {str(m): v for m, v in cv.items()},
        "heldout": heldout,
        "weights": [round(float(w), 4) for w in weights],
    }


def class_index(ref: np.ndarray, label_ids: Sequence[int]) -> np.ndarray:
    """Label ids -> class indices (ids not in ``label_ids``: background)."""
    lut = np.zeros(max(max(label_ids), int(ref.max())) + 1, dtype=np.int64)
    lut[list(label_ids)] = np.arange(len(label_ids))
    return lut[ref.astype(np.int64)]


def read_labels(folder: Path) -> dict[str, np.ndarray]:
    """``{case: label ids (Z, Y, X)}`` of a folder of NIfTI label maps."""
    return {strip_suffix(p.name): read_image(p)[0] for p in sorted(folder.glob("*.nii*"))}


def build_cross_work(arms: dict[str, Path], fold: int | str, dst: Path) -> None:
    """A work folder whose runs are the arms' fold-``fold`` validation predictions, as configuration ``<arm>``
    with the arm's architecture (plan, fingerprint, dataset reference and splits from the first arm)."""
    if dst.exists():
        shutil.rmtree(dst)
    first, wd = WorkDir(next(iter(arms.values()))), WorkDir(dst)
    dst.mkdir(parents=True)
    for src, to in zip(
        (first.plans, first.fingerprint, first.dataset_ref, first.splits),
        (wd.plans, wd.fingerprint, wd.dataset_ref, wd.splits),
    ):
        if src.is_file():
            shutil.copy2(src, to)
    for name, work in arms.items():
        for config, arch in WorkDir(work).run_pairs():
            validation = WorkDir(work).run(config, arch, fold).validation
            if validation.is_dir():
                shutil.copytree(validation, wd.run(name, arch, fold).validation)


def copy_work(work: Path, dst: Path) -> None:
    """A copy of a work folder without its preprocessed cache (find-best and predict do not read it)."""
    if dst.exists():
        shutil.rmtree(dst)
    skip = {WorkDir(work).preprocessed_root.name}
    shutil.copytree(work, dst, ignore=lambda folder, names: [n for n in names if Path(folder) == work and n in skip])


def header(threads: int) -> dict[str, Any]:
    """Machine, date and load when the table was assembled."""
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_1_5_15": None if load is None else [round(x, 1) for x in load],
        "subprocess_threads": threads,
    }


def distill_row(
    arms: Sequence[dict[str, Any]],
    runs: Sequence[Path],
    fold: int | str,
    plan_work: str,
    student: str,
    tests: tuple[str, str],
) -> dict[str, Any]:
    """The distillation row: the student command (teachers: ``runs``), filled by ``bench_techniques.student_row``."""
    teachers = " ".join(shlex.quote(str(r)) for r in runs)
    train_s = sum(a["train_s"] for a in arms)
    return {
        "technique": f"distilled student of all {len(arms)} arms (not trained yet)",
        "commands": [
            f"python scripts/bench_arms.py {plan_work} {tests[0]} {tests[1]} -o {student} --fold {fold} --find-best "
            f'--arm student="--distill-from {teachers}"',
            f"scripts/bench_techniques.py ... --student {student}",
        ],
        "note": f"teachers' training {train_s:.0f} s is spent before the student's",
        "vs": "raw_dice",
    }


def _delta(row: dict[str, Any], plain: dict[str, Any] | None) -> float | None:
    key = row.get("vs")
    if plain is None or key not in ("dice", "raw_dice") or row.get(key) is None or plain.get(key) is None:
        return None
    return float(row[key]) - float(plain[key])


def fmt(value: Any, spec: str = ".4f") -> str:
    """A table cell: ``-`` for None, floats formatted with ``spec``."""
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def render(result: dict[str, Any]) -> str:
    """The markdown table(s) of :func:`bench_techniques.main`'s result, commands listed under each table."""
    h = result["header"]
    lines = [
        f"Assembled {h['date_utc']} UTC on {h['cpu']}, {h['cores']} cores, load average (1/5/15 min) "
        f"{h['load_average_1_5_15']}; derived steps ran with {h['subprocess_threads']} torch thread(s).",
        "",
    ]
    for tag, block in result["dirs"].items():
        rows, plain = block["rows"], block["rows"][block["plain_index"]] if block["plain_index"] is not None else None
        lines += [
            f"### {tag}",
            "",
            "| # | technique | iterations | train s | fold Dice | held-out Dice | raw held-out Dice | HD95 mm "
            "| predict s | total s | vs plain | note |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for i, r in enumerate(rows, 1):
            d = _delta(r, plain)
            note = r.get("note", "")
            if d is not None and r is not plain and abs(d) < SEED_THRESHOLD:
                note = "; ".join(x for x in (note, f"below {SEED_THRESHOLD}: needs a second seed") if x)
            lines.append(
                f"| {i} | {r['technique']} | {fmt(r.get('iterations'))} | {fmt(r.get('train_s'), '.0f')} "
                f"| {fmt(r.get('fold_dice'))} | {fmt(r.get('dice'))} | {fmt(r.get('raw_dice'))} "
                f"| {fmt(r.get('hd95'), '.2f')} | {fmt(r.get('predict_s'), '.1f')} | {fmt(r.get('total_s'), '.0f')} "
                f"| {'base' if r is plain else '-' if d is None else format(d, '+.4f')} | {note} |"
            )
        lines += ["", "Commands:", ""]
        for i, r in enumerate(rows, 1):
            lines += [f"{i}. `{c}`" for c in r.get("commands", [])[:1]] + [
                f"   `{c}`" for c in r.get("commands", [])[1:]
            ]
        lines.append("")
    return "\n".join(lines)
