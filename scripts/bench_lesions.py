"""Lesion-wise evaluation of a real prediction folder: generate -> plan -> train -> find-best -> predict -> evaluate.

    PYTHONPATH=. python scripts/bench_lesions.py --out /tmp/bench_lesions \\
        [--panoptica-python /work/panoptica_venv/bin/python] [--stages data plan train find-best predict evaluate]

1. ``data``: a many-small-lesions dataset (:mod:`medseg.io.synthetic_lesions`, ``--cases`` training cases of
   64^3 voxels, slice spacing 1-2 mm per case) and ``--test-cases`` held-out cases of another seed
   (``OUT/test/imagesTr``, references ``OUT/test/labelsTr``).
2. ``plan``: ``medseg plan --device cpu --time-budget MINUTES``; ``train``: ``medseg train --fold 0`` within that
   budget (one thread: ``OMP_NUM_THREADS=1``, ``--num-workers 1``).
3. ``find-best``: ``medseg find-best --metric lesion_f1`` (fits the minimum component volume among the rules).
4. ``predict``: ``medseg predict --instances`` on the held-out images twice, with find-best's rules
   (``OUT/pred_rules``) and with ``--no-postprocessing`` (``OUT/pred_none``); when the rules hold steps other
   than the minimum volume, the evaluate stage applies (same code, each case's spacing) the minimum volume alone
   (``OUT/pred_min_volume_only``) and the rules without it (``OUT/pred_no_min_volume``) to ``OUT/pred_none``.
5. ``evaluate``: ``medseg evaluate --lesion-wise`` of each folder; prints the voxel-wise and lesion-wise tables
   (Markdown) and, with ``--panoptica-python``, runs ``scripts/crosscheck_panoptica.py --pred`` on the
   postprocessed folder and prints its largest differences.

Every stage runs the real command line in a child process and logs its wall time; stages can be rerun alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medseg.io.image import read_image, write_image
from medseg.io.synthetic_lesions import generate_lesion_dataset
from medseg.io.workdir import WorkDir
from medseg.postprocessing import apply_postprocessing, load_rules

logger = logging.getLogger("bench_lesions")

STAGES = ("data", "plan", "train", "find-best", "predict", "evaluate")


def _medseg(*args: str) -> float:
    """Run ``python -m medseg ARGS`` with one thread; its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    logger.info("$ medseg %s", " ".join(args))
    subprocess.run([sys.executable, "-m", "medseg", *args], check=True, env=env)
    seconds = time.perf_counter() - start
    logger.info("  %.1f s", seconds)
    return seconds


def _only(rules: dict[str, Any], min_volume: bool) -> dict[str, Any]:
    """The rules with only their ``min_volume`` steps (``min_volume`` True) or without them."""
    per_label = {
        lab: [s for s in steps if (s.get("op") == "min_volume") == min_volume]
        for lab, steps in (rules.get("per_label") or {}).items()
    }
    return {**rules, "per_label": {lab: steps for lab, steps in per_label.items() if steps}}


def _derive(source: Path, target: Path, rules: dict[str, Any]) -> None:
    """Apply ``rules`` (with each case's spacing) to every unpostprocessed prediction of ``source`` into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.nii.gz")):
        seg, geometry = read_image(path)
        write_image(apply_postprocessing(seg, rules, geometry.spacing), geometry, target / path.name)


def _table(name: str, metrics: dict[str, Any]) -> list[str]:
    """One Markdown row per class of a ``medseg evaluate --lesion-wise`` result."""
    rows = []
    for lab, m in sorted(metrics["mean"].items(), key=lambda kv: kv[0]):
        lw = m["lesion_wise"]
        hd = m.get("hd95")
        rows.append(
            f"| {name} | {lab} | {m['dice']:.3f} | {'-' if hd is None else f'{hd:.2f}'} | "
            f"{lw['tp']}/{lw['fp']}/{lw['fn']} | {lw['precision']:.3f} | {lw['recall']:.3f} | {lw['f1']:.3f} | "
            f"{lw['lesion_dice']:.3f} | {lw['lesion_hd95']:.1f} | {lw['pq']:.3f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the data, work folder and predictions")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--cases", type=int, default=24, help="training cases")
    ap.add_argument("--test-cases", type=int, default=8, help="held-out cases")
    ap.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    ap.add_argument("--panoptica-python", default=None, help="python of a venv with panoptica (cross-check)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out
    data, test, work = out / "data", out / "test", out / "work"
    folders = {
        "none": out / "pred_none",
        "fitted rules": out / "pred_rules",
        "min volume only": out / "pred_min_volume_only",
        "rules without min volume": out / "pred_no_min_volume",
    }
    if "data" in args.stages:
        generate_lesion_dataset(data, num_cases=args.cases, seed=0)
        generate_lesion_dataset(test, num_cases=args.test_cases, seed=1, prefix="test")
    if "plan" in args.stages:
        _medseg(
            "plan",
            str(data),
            "-o",
            str(work),
            "--device",
            "cpu",
            "--time-budget",
            f"{args.minutes:g}",
            "--num-workers",
            "1",
            "--configs",
            "3d_fullres",
        )
    if "train" in args.stages:
        _medseg("train", str(work), "--fold", "0", "--device", "cpu", "--num-workers", "1")
    if "find-best" in args.stages:
        _medseg("find-best", str(work), "--metric", "lesion_f1")
    if "predict" in args.stages:
        images = str(test / "imagesTr")
        common = ["-m", str(work), "--device", "cpu", "--num-workers", "1", "--overwrite"]
        _medseg("predict", "-i", images, "-o", str(folders["fitted rules"]), "--instances", *common)
        _medseg("predict", "-i", images, "-o", str(folders["none"]), "--no-postprocessing", *common)
    if "evaluate" in args.stages:
        rules = load_rules(WorkDir(work).postprocessing)
        print("\nfitted rules:", json.dumps(rules.get("per_label")), json.dumps(rules.get("scores")))
        for name, min_volume in (("min volume only", True), ("rules without min volume", False)):
            variant = _only(rules, min_volume)
            shutil.rmtree(folders[name], ignore_errors=True)
            if variant["per_label"] != rules["per_label"]:  # else the same as the fitted rules
                _derive(folders["none"], folders[name], variant)
        lines = [
            "| predictions | class | voxel Dice | HD95 mm | TP/FP/FN | precision | recall | F1 | lesion Dice "
            "| lesion HD95 mm | PQ |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, folder in folders.items():
            if not folder.is_dir():
                continue
            metrics_path = out / f"metrics_{folder.name}.json"
            _medseg("evaluate", str(folder), str(test / "labelsTr"), "-o", str(metrics_path), "--lesion-wise")
            lines += _table(name, json.loads(metrics_path.read_text()))
        print("\n".join(lines))
        if args.panoptica_python:
            script = Path(__file__).resolve().parent / "crosscheck_panoptica.py"
            for name in ("none", "fitted rules"):
                check = out / f"crosscheck_{folders[name].name}"
                cmd = [sys.executable, str(script), "--panoptica-python", args.panoptica_python]
                cmd += ["--pred", str(folders[name]), "--ref", str(test / "labelsTr"), "--out", str(check)]
                subprocess.run(cmd, check=False)
                report = json.loads((check / "crosscheck.json").read_text())["predictions"]
                print(f"panoptica vs medseg on {folders[name].name} ({report['pairs']} class masks), max |diff|:")
                for key, stat in report.items():
                    if isinstance(stat, dict):
                        print(f"  {key}: {stat['max_abs_diff']:.3g} over {stat['compared']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
