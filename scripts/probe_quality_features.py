"""Which per-case feature ranks one model's cases by their real Dice? Candidate features against the real Dice.

    python scripts/probe_quality_features.py -o OUT --model 20min=WORK20 --model 10min=WORK10 \\
        --validation IMAGES LABELS --held IMAGES LABELS [--cases N]

Each ``--model NAME=WORK`` (fold 0 of a work folder on which ``medseg find-best`` ran: its temperature and
postprocessing are applied) predicts its fold-0 validation cases (from ``WORK/splits.json``; images and
references in the ``--validation`` folders, ``CASE.nii.gz`` or ``CASE_0000.nii.gz``) and the ``--held`` cases,
keeping every TTA pass of ``medseg predict``'s full TTA (each flip of the plan's mirror axes x each grid shift,
one softmax per pass, on the original grid; ``OUT/passes/NAME_SET/CASE.npz``, reused when present). Per case,
the mean over foreground labels of each candidate (higher = predicted better; see :data:`CANDIDATES`) and the
real mean foreground Dice of the postprocessed argmax of the passes' mean probabilities.

Printed: the Spearman correlation of each candidate with the real Dice per (model, set); on the held-out sets
the difference to the expected Dice with a 90% bootstrap interval; and two-feature scores (expected Dice plus
one candidate) fitted by least squares on a model's validation cases and ranked on its held-out ones.
``OUT/features_NAME_SET.json`` keeps every case's values. Nothing is written next to the inputs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats

from medseg.ensembling import work_dir_predictor
from medseg.inference.sliding_window import predict_sliding_window, tta_variants
from medseg.io.image import read_image
from medseg.io.workdir import WorkDir
from medseg.postprocessing.calibration import apply_temperature
from medseg.postprocessing.operations import apply_postprocessing
from medseg.postprocessing.quality_features import label_features
from medseg.preprocessing import revert_to_original

#: The candidates, each per label (then averaged over the labels), higher = predicted better.
CANDIDATES = {
    "expected_dice": "quality.json's expected Dice (the score's feature)",
    "pass_agreement": "mean Dice of each TTA pass's argmax with the prediction",
    "band_entropy": "minus the entropy summed over the surface band, per predicted voxel",
    "ambiguous": "minus the voxels within 3 of the mask with 0.2 < q < 0.8, per predicted voxel",
    "lowest_expected_dice": "the lowest expected Dice of the labels (case-level)",
    "surface_per_voxel": "minus the surface band's voxels per predicted voxel",
    "soft_volume": "minus |log(q summed within 3 voxels / predicted volume)|",
    "pass_volume_spread": "minus SD / mean of the passes' predicted volumes",
    "entropy_inside": "minus the mean entropy inside the mask",
    "entropy_border": "minus the mean entropy in the surface band",
    "contrast": "image contrast across the boundary (inner vs outer 2-voxel shell, in SDs of the near region)",
    "log_volume": "log of the predicted volume (voxels)",
    "expected_dice_whole": "expected Dice with the whole grid's probability mass",
    "pass_soft_dice": "mean soft Dice of each pass's probabilities with their mean",
}
_FULL = ndimage.generate_binary_structure(3, 3)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _image_path(folder: Path, case: str) -> Path:
    path = folder / f"{case}_0000.nii.gz"
    return path if path.is_file() else folder / f"{case}.nii.gz"


def tta_passes(work: Path, images: Path, cases: list[str], out: Path) -> None:
    """Each case's TTA passes ``(P, K, Z, Y, X)`` (float16, original grid) as ``out/CASE.npz``."""
    predictor = work_dir_predictor(work, device="cpu")
    out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        target = out / f"{case}.npz"
        if target.is_file():
            continue
        image, geometry = read_image(_image_path(images, case))
        prepared = predictor.preprocess(image[None], geometry, case)
        passes = []
        for member in predictor.members:
            stage, net = member.stage, member.stage.network
            data, props = prepared.per_config[member.configuration]
            axes, shifts = tta_variants(stage.mirror_axes, stage.total_stride)
            flips = [tuple(a + 1 for a, f in zip(axes, on) if f) for on in itertools.product((0, 1), repeat=len(axes))]
            for shift, flip in itertools.product(shifts, flips):
                x = torch.as_tensor(np.flip(data, flip).copy() if flip else data)
                with torch.no_grad():
                    p = predict_sliding_window(member.model, x, net.patch_size, predictor.num_classes, shifts=[shift])
                p = np.asarray(p.cpu().numpy() if isinstance(p, torch.Tensor) else p, dtype=np.float32)
                passes.append(revert_to_original(np.flip(p, flip).copy() if flip else p, props))
        np.savez_compressed(target, probs=np.stack(passes).astype(np.float16))
        logging.info("%s: %d passes", case, len(passes))


def case_features(
    passes: np.ndarray,
    image: np.ndarray,
    ref: np.ndarray,
    temperature: float,
    rules: Any,
    ids: list[int],
    spacing: tuple[float, ...] | None = None,
) -> tuple[float, dict[str, float]]:
    """The real mean foreground Dice and the candidates (:data:`CANDIDATES`) of one case.

    Args:
        passes: TTA passes' probabilities ``(P, K, Z, Y, X)``.
        image: the image ``(Z, Y, X)``; ref: its reference label ids ``(Z, Y, X)``.
        temperature, rules: find-best's temperature and postprocessing rules.
        ids: the plan's label ids (background first).
        spacing: the voxel spacing (mm, the array's axis order), for rules that need it (``min_volume``).
    """
    passes = passes.astype(np.float32)
    p = passes.mean(0)
    q = apply_temperature(p / p.sum(0, keepdims=True), temperature)
    pred = apply_postprocessing(np.asarray(ids)[q.argmax(0)].astype(np.int32), rules, spacing)
    entropy = -(q * np.log(np.clip(q, 1e-12, 1.0))).sum(0) / np.log(len(ids))
    pass_classes = passes.argmax(1)
    real, per = [], {k: [] for k in CANDIDATES if k != "lowest_expected_dice"}
    for k, label in enumerate(ids[1:], start=1):
        mask = pred == label
        n = max(int(mask.sum()), 1)
        real.append(_dice(mask, ref == label))
        f = label_features(mask, q[k], entropy, 1.0, None)
        near = ndimage.binary_dilation(mask, _FULL, iterations=3)
        band = ndimage.binary_dilation(mask, _FULL) & ~ndimage.binary_erosion(mask, _FULL)
        inner = mask & ~ndimage.binary_erosion(mask, _FULL, iterations=2)
        outer = ndimage.binary_dilation(mask, _FULL, iterations=2) & ~mask
        volumes = np.array([(c == k).sum() for c in pass_classes], dtype=np.float64)
        spread = float(image[near].std()) or 1.0 if mask.any() else 1.0
        values = {
            "expected_dice": f["expected_dice"],
            "pass_agreement": np.mean([_dice(c == k, mask) for c in pass_classes]),
            "band_entropy": -float(entropy[band].sum()) / n,
            "ambiguous": -float(((q[k] > 0.2) & (q[k] < 0.8) & near).sum()) / n,
            "surface_per_voxel": -float(band.sum()) / n,
            "soft_volume": -abs(np.log(max(float(q[k][near].sum()), 1e-3) / n)),
            "pass_volume_spread": -volumes.std() / max(volumes.mean(), 1.0),
            "entropy_inside": -(f["uncertainty_inside"] or 0.0),
            "entropy_border": -(f["uncertainty_border"] or 0.0),
            "contrast": abs(float(image[inner].mean()) - float(image[outer].mean())) / spread if mask.any() else 0.0,
            "log_volume": np.log(n),
            "expected_dice_whole": 2.0 * float(q[k][mask].sum()) / (float(q[k].sum()) + n),
            "pass_soft_dice": np.mean(
                [2.0 * float((s[k] * q[k]).sum()) / max(float(s[k].sum() + q[k].sum()), 1e-9) for s in passes]
            ),
        }
        for key, value in values.items():
            per[key].append(float(value))
    features = {key: float(np.mean(v)) for key, v in per.items()}
    features["lowest_expected_dice"] = float(np.min(per["expected_dice"]))
    return float(np.mean(real)), features


def _set_features(work: Path, passes_dir: Path, images: Path, labels: Path) -> dict[str, dict[str, float]]:
    fitted = json.loads(WorkDir(work).postprocessing.read_text())
    temperature = float((fitted.get("calibration") or {}).get("temperature", 1.0))
    ids = [int(i) for i in fitted["label_ids"]]
    rows = {}
    for npz in sorted(passes_dir.glob("*.npz")):
        with np.load(npz) as f:
            passes = f["probs"]
        image = read_image(_image_path(images, npz.stem))[0].astype(np.float32)
        ref, geometry = read_image(labels / f"{npz.stem}.nii.gz")
        dice, features = case_features(
            passes, image, ref.astype(np.int64), temperature, fitted, ids, tuple(geometry.spacing)
        )
        rows[npz.stem] = {"dice": dice, **features}
    return rows


def _column(rows: dict[str, dict[str, float]], key: str) -> np.ndarray:
    return np.asarray([r[key] for r in rows.values()])


def _rho(x: np.ndarray, y: np.ndarray) -> float:
    return float(stats.spearmanr(x, y).statistic)


def report(sets: dict[str, dict[str, dict[str, float]]], models: list[str]) -> list[str]:
    """The Markdown lines of the comparison (see the module docstring)."""
    rng = np.random.default_rng(0)
    names = list(sets)
    lines = [
        "| feature | " + " | ".join(f"{n} ({len(sets[n])})" for n in names) + " | held: minus expected Dice [90%] |",
        "| --- |" + " ---: |" * len(names) + " --- |",
    ]
    for feature in CANDIDATES:
        cells = [f"{_rho(_column(s, feature), _column(s, 'dice')):+.2f}" for s in sets.values()]
        diffs = []
        for name in (n for n in names if n.endswith("_held")):
            d, x, e = (_column(sets[name], k) for k in ("dice", feature, "expected_dice"))
            boot = []
            for _ in range(2000):
                i = rng.integers(0, len(d), len(d))
                boot.append(_rho(x[i], d[i]) - _rho(e[i], d[i]))
            diffs.append(f"{np.mean(boot):+.2f} [{np.percentile(boot, 5):+.2f}, {np.percentile(boot, 95):+.2f}]")
        lines.append(f"| {feature} | " + " | ".join(cells) + f" | {' / '.join(diffs)} |")
    lines.append("")
    lines.append("expected Dice + one candidate, least squares on validation, Spearman on held-out:")
    for feature in (f for f in CANDIDATES if f != "expected_dice"):
        scores = []
        for model in models:
            val, held = sets.get(f"{model}_val"), sets.get(f"{model}_held")
            if not val or not held:
                continue
            design = np.c_[np.ones(len(val)), _column(val, "expected_dice"), _column(val, feature)]
            coef = np.linalg.lstsq(design, _column(val, "dice"), rcond=None)[0]
            fitted = np.c_[np.ones(len(held)), _column(held, "expected_dice"), _column(held, feature)] @ coef
            scores.append(f"{model} {_rho(fitted, _column(held, 'dice')):+.2f}")
        lines.append(f"- expected_dice + {feature}: {', '.join(scores)}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=WORK")
    parser.add_argument("--validation", nargs=2, type=Path, metavar=("IMAGES", "LABELS"))
    parser.add_argument("--held", nargs=2, type=Path, metavar=("IMAGES", "LABELS"))
    parser.add_argument("--cases", type=int, default=None, help="only the first N cases of each set")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    models = [tuple(m.split("=", 1)) for m in args.model]
    sets: dict[str, dict[str, dict[str, float]]] = {}
    for set_name, folders in (("val", args.validation), ("held", args.held)):
        if folders is None:
            continue
        images, labels = folders
        for name, work in models:
            if set_name == "val":
                cases = sorted(json.loads(WorkDir(Path(work)).splits.read_text())[0]["val"])
            else:
                cases = sorted(p.name.split("_0000.nii.gz")[0] for p in images.glob("*_0000.nii.gz"))
            passes_dir = args.output / "passes" / f"{name}_{set_name}"
            tta_passes(Path(work), images, cases[: args.cases], passes_dir)
            rows = _set_features(Path(work), passes_dir, images, labels)
            sets[f"{name}_{set_name}"] = rows
            (args.output / f"features_{name}_{set_name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(report(dict(sorted(sets.items(), key=lambda kv: kv[0].endswith("held"))), [m for m, _ in models])))


if __name__ == "__main__":
    main()
