"""Cross-check medseg's lesion-wise metrics against panoptica (the reference implementation of panoptic quality).

panoptica is not a medseg dependency: install it into a venv of its own and give that venv's python::

    python3 -m venv /work/panoptica_venv && /work/panoptica_venv/bin/pip install panoptica
    PYTHONPATH=. python scripts/crosscheck_panoptica.py --panoptica-python /work/panoptica_venv/bin/python \\
        --real ../shared/data/totalseg_ct --out /tmp/lesion_crosscheck

Compares, per binary mask pair (one class of one case), medseg's ``lesion_wise_scores`` (IoU matching at 0.5,
full connectivity) with panoptica (semantic input, cc3d connected components = 26-connectivity,
``MaxBipartiteMatching`` at IoU 0.5) on synthetic cases and, with ``--real``, on a prediction folder made by
perturbing a dataset's labels (components dropped, eroded, dilated; written to ``OUT/pred``, reference =
the dataset's ``labelsTr``), and with ``--pred FOLDER --ref FOLDER`` on an existing prediction folder (every class
of every case with a reference of the same name, e.g. ``medseg predict`` output against held-out labels;
``scripts/bench_lesions.py`` runs it on a trained model's predictions). Where the definitions agree the numbers must be equal within 1e-6; the
definition differences (docs/evaluation.md) are reported separately. Exits 1 on a disagreement.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.evaluation.lesion_wise import LesionWiseOptions, image_diagonal_mm, lesion_wise_scores
from medseg.io.image import read_image, strip_suffix, write_image

logger = logging.getLogger("crosscheck_panoptica")

#: Run by panoptica's python: reads pairs from an .npz, writes panoptica's numbers as JSON lines.
PANOPTICA_WORKER = r"""
import json, sys, numpy as np
from panoptica import (Panoptica_Evaluator, InputType, ConnectedComponentsInstanceApproximator, CCABackend,
                       MaxBipartiteMatching, Metric)
from panoptica.utils.logger import set_log_level
def evaluator(metrics):
    return Panoptica_Evaluator(expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(CCABackend.cc3d),
        instance_matcher=MaxBipartiteMatching(matching_threshold=0.5),
        instance_metrics=metrics, global_metrics=[], verbose=False, log_times=False)
ev = evaluator([Metric.DSC, Metric.IOU, Metric.HD95])
ev_no_hd = evaluator([Metric.DSC, Metric.IOU])  # panoptica has no zero-TP edge case for HD95
data = np.load(sys.argv[1])
out = []
for i in range(int(data["n"])):
    args = (data[f"pred{i}"].astype(np.uint8), data[f"ref{i}"].astype(np.uint8))
    spacing = tuple(float(s) for s in data[f"spacing{i}"])
    try:
        r = ev.evaluate(*args, voxelspacing=spacing, verbose=False)["ungrouped"]
    except NotImplementedError:
        r = ev_no_hd.evaluate(*args, voxelspacing=spacing, verbose=False)["ungrouped"]
    row = {}
    for k in ("tp", "fp", "fn", "prec", "rec", "rq", "sq", "sq_dsc", "sq_hd95", "pq"):
        try:
            v = float(getattr(r, k))
        except Exception:
            v = float("nan")
        row[k] = v
    out.append(row)
json.dump(out, open(sys.argv[2], "w"))
"""

TOL = 1e-6


def _ball(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def synthetic_pairs(seed: int = 0, n_random: int = 12) -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    """Named ``(name, pred, ref, spacing)`` binary 3D pairs: hand-built edge cases and random lesion sets."""
    shape = (24, 40, 40)
    big, small = _ball(shape, (12, 12, 12), 6), _ball(shape, (12, 30, 30), 2)
    split_a = _ball(shape, (12, 12, 9), 3.5)
    split_b = _ball(shape, (12, 12, 16), 3.5)
    empty = np.zeros(shape, bool)
    pairs = [
        ("missed_small", big, big | small, (1.0, 1.0, 1.0)),
        ("false_small", big | small, big, (2.0, 0.8, 0.8)),
        ("two_preds_one_ref", split_a | split_b, big, (1.0, 1.0, 1.0)),
        ("shifted", np.roll(big, 2, axis=2) | small, big | small, (3.0, 1.0, 1.0)),
        ("pred_empty", empty, big, (1.0, 1.0, 1.0)),
        ("ref_empty", big, empty, (1.0, 1.0, 1.0)),
    ]
    rng = np.random.default_rng(seed)
    for i in range(n_random):
        ref = np.zeros(shape, bool)
        pred = np.zeros(shape, bool)
        for _ in range(int(rng.integers(1, 7))):
            c = tuple(float(rng.uniform(3, n - 3)) for n in shape)
            r = float(rng.uniform(1.0, 5.0))
            ref |= _ball(shape, c, r)
            if rng.random() < 0.8:  # detected, somewhat off
                c2 = tuple(x + float(rng.normal(0, 0.5)) for x in c)
                pred |= _ball(shape, c2, max(0.8, r + float(rng.normal(0, 0.4))))
        for _ in range(int(rng.integers(0, 3))):  # false lesions
            pred |= _ball(shape, tuple(float(rng.uniform(3, n - 3)) for n in shape), float(rng.uniform(1, 3)))
        spacing = (float(rng.choice([1.0, 2.0, 3.0])), float(rng.uniform(0.6, 1.2)), float(rng.uniform(0.6, 1.2)))
        pairs.append((f"random_{i}", pred, ref, spacing))
    return pairs


def perturb_labels(seg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong segmentation: per class, components dropped (p 0.2), eroded or dilated (p 0.3 each)."""
    out = np.zeros_like(seg)
    for lab in (int(v) for v in np.unique(seg) if v != 0):
        comps, n = ndimage.label(seg == lab, structure=np.ones((3, 3, 3)))
        for c in range(1, n + 1):
            m = comps == c
            u = rng.random()
            if u < 0.2:
                continue
            if u < 0.5:
                m = ndimage.binary_erosion(m)
            elif u < 0.8:
                m = ndimage.binary_dilation(m) & ((seg == 0) | (seg == lab))
            out[m & (out == 0)] = lab
    return out


def real_pairs(data: Path, out: Path, seed: int) -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    """Perturb every label map of ``data/labelsTr`` into ``out/pred`` and return its per-class pairs."""
    rng = np.random.default_rng(seed)
    (out / "pred").mkdir(parents=True, exist_ok=True)
    pairs = []
    for path in sorted((data / "labelsTr").iterdir()):
        ref, geo = read_image(path)
        ref = ref.astype(np.int64)
        pred = perturb_labels(ref, rng)
        write_image(pred.astype(np.uint8), geo, out / "pred" / path.name)
        for lab in (int(v) for v in np.union1d(np.unique(ref), np.unique(pred)) if v != 0):
            pairs.append((f"{strip_suffix(path.name)}:{lab}", pred == lab, ref == lab, tuple(geo.spacing)))
    return pairs


def folder_pairs(pred_dir: Path, ref_dir: Path) -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    """Per-class pairs of every prediction in ``pred_dir`` that has a reference of the same name in ``ref_dir``."""
    refs = {strip_suffix(p.name): p for p in ref_dir.iterdir() if p.is_file()}
    pairs = []
    for path in sorted(pred_dir.iterdir()):
        case = strip_suffix(path.name)
        if not path.is_file() or case not in refs or not path.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
            continue
        pred, geo = read_image(path)
        ref = read_image(refs[case])[0]
        for lab in (int(v) for v in np.union1d(np.unique(ref), np.unique(pred)) if v != 0):
            pairs.append((f"{case}:{lab}", pred == lab, ref == lab, tuple(geo.spacing)))
    return pairs


def run_panoptica(python: str, pairs: list) -> list[dict[str, float]]:
    """panoptica's numbers for every pair, computed by ``python`` (a venv with panoptica)."""
    with tempfile.TemporaryDirectory() as tmp:
        arrays: dict[str, np.ndarray] = {"n": np.asarray(len(pairs))}
        for i, (_, pred, ref, spacing) in enumerate(pairs):
            arrays[f"pred{i}"], arrays[f"ref{i}"], arrays[f"spacing{i}"] = pred, ref, np.asarray(spacing)
        np.savez_compressed(Path(tmp) / "pairs.npz", **arrays)  # type: ignore[arg-type]
        subprocess.run(
            [python, "-c", PANOPTICA_WORKER, str(Path(tmp) / "pairs.npz"), str(Path(tmp) / "out.json")],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return json.loads((Path(tmp) / "out.json").read_text())


def compare(pairs: list, theirs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per key: largest |medseg - panoptica| where both are defined, and how many pairs were compared."""
    stats: dict[str, dict[str, float]] = {}

    def add(key: str, ours: float, ref: float) -> None:
        s = stats.setdefault(key, {"max_abs_diff": 0.0, "compared": 0, "undefined_in_panoptica": 0})
        if ref is None or not math.isfinite(ref):
            s["undefined_in_panoptica"] += 1
            return
        s["compared"] += 1
        s["max_abs_diff"] = max(s["max_abs_diff"], abs(ours - ref))

    for (name, pred, ref, spacing), p in zip(pairs, theirs):
        ours = lesion_wise_scores(pred, ref, spacing, LesionWiseOptions())
        n = ours.tp + ours.fp + ours.fn
        for k, pk in (("tp", "tp"), ("fp", "fp"), ("fn", "fn"), ("precision", "prec"), ("recall", "rec")):
            add(k, float(getattr(ours, k)), p[pk])
        add("f1", ours.f1, p["rq"])
        add("pq", ours.pq, p["pq"])
        if ours.tp:  # lesion Dice = panoptica's mean tp Dice x tp / n; HD95 with the diagonal for fp and fn
            add("lesion_dice", ours.lesion_dice, p["sq_dsc"] * ours.tp / n)
            hd_theirs = (p["sq_hd95"] * ours.tp + (ours.fp + ours.fn) * image_diagonal_mm(ref.shape, spacing)) / n
            add("lesion_hd95 (HD95 definitions differ)", ours.lesion_hd95, hd_theirs)
        if abs(ours.f1 - p["rq"]) > TOL and math.isfinite(p["rq"]):
            logger.warning("%s: f1 %.6f vs panoptica rq %.6f", name, ours.f1, p["rq"])
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--panoptica-python", required=True, help="python of a venv with panoptica installed")
    ap.add_argument("--real", type=Path, default=None, help="dataset folder with labelsTr to perturb and compare")
    ap.add_argument("--out", type=Path, default=Path("lesion_crosscheck"), help="folder for the perturbed predictions")
    ap.add_argument("--pred", type=Path, default=None, help="a prediction folder to compare (with --ref)")
    ap.add_argument("--ref", type=Path, default=None, help="the reference label folder of --pred")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sets = {"synthetic": synthetic_pairs(args.seed)}
    if args.real is not None:
        sets["real"] = real_pairs(args.real, args.out, args.seed)
    if args.pred is not None:
        if args.ref is None:
            ap.error("--pred needs --ref")
        sets["predictions"] = folder_pairs(args.pred, args.ref)
    ok = True
    report = {}
    for name, pairs in sets.items():
        stats = compare(pairs, run_panoptica(args.panoptica_python, pairs))
        report[name] = {"pairs": len(pairs), **stats}
        logger.info("%s: %d mask pairs", name, len(pairs))
        for key, s in stats.items():
            agree = "differ" in key or s["max_abs_diff"] <= TOL
            ok &= agree
            logger.info(
                "  %-40s max |diff| %.3g over %d pairs (%d undefined in panoptica)%s",
                key,
                s["max_abs_diff"],
                s["compared"],
                s["undefined_in_panoptica"],
                "" if agree else "  <-- DISAGREES",
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crosscheck.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("equal within %g where the definitions agree: %s", TOL, "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
