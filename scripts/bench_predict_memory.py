"""Benchmark prediction memory: peak RSS and seconds of big, many-class cases, unconstrained and under --max-ram.

    python scripts/bench_predict_memory.py synthetic [--scale 1.0] [--classes 118] [--max-ram 4] [--tta]
    python scripts/bench_predict_memory.py shared [--max-ram 1] [--cases voxelmorph] [--shared-tta off]

``synthetic`` writes a CT-like volume (``400 x 512 x 512`` (Z, Y, X) at 1.5 x 0.8 x 0.8 mm times ``--scale``
per axis, int16 HU: air, a body ellipse, denser blobs) and predicts it with a 118-class UNet planned by hand
(3d_fullres at 1.5 mm isotropic like TotalSegmentator's fine model; 4 base features, patch 64^3, random
weights: memory and time do not depend on the weights). ``shared`` predicts the shared data's
``totalseg_ct/example_ct`` (118 label ids) and ``voxelmorph_brain`` (46) with such a UNet at their own
spacing. Each run is its own process through :func:`medseg.inference.predict_folder` (what ``medseg
predict`` calls): default budget (``auto``, 80 % of the available memory), no budget, and ``--max-ram``;
TTA on and off. Reported: wall seconds, peak RSS (``ru_maxrss`` of the child), whether the case was
streamed, and the voxels whose label differs from the unconstrained run.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _plan(classes: int, spacing: tuple[float, float, float], patch: tuple[int, int, int]):
    from medseg.networks.spec import NetworkSpec
    from medseg.planning.plan import ConfigurationPlan, NetworkPlan, NormalizationSpec, Plan

    spec = NetworkSpec(
        arch="unet",
        kernel_sizes=((3, 3, 3),) * 4,
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
        base_features=4,
        max_features=32,
    )
    cfg = ConfigurationPlan(
        name="3d_fullres",
        dims=3,
        spacing=spacing,
        median_shape=patch,
        normalization=(NormalizationSpec("zscore"),),
        networks={"unet": NetworkPlan(spec, patch_size=patch, batch_size=2)},
    )
    return Plan(
        dataset_name="bench",
        channel_names=("CT",),
        label_ids=tuple(range(classes)),
        label_names=tuple(f"c{i}" for i in range(classes)),
        original_median_spacing=spacing,
        original_median_shape=patch,
        configurations={"3d_fullres": cfg},
        default_configuration="3d_fullres",
    ).validate()


def ct_like_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 HU ``(Z, Y, X)``: air (-1000) around an elliptic body (soft tissue ~40 HU, noise) with blobs."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.42 * y)) ** 2 + ((xx - x / 2) / (0.47 * x)) ** 2 <= 1.0
    vol = np.full(shape, -1000, dtype=np.int16)
    for k in range(z):
        sl = vol[k]
        sl[body] = 40
        sl += rng.normal(0, 15, (y, x)).astype(np.int16)
    for _ in range(12):  # organs and bones: brighter balls
        c = rng.uniform(0.25, 0.75, 3) * np.array(shape)
        r = rng.uniform(0.04, 0.1) * min(shape[1:])
        lo = np.maximum(0, (c - r).astype(int))
        hi = np.minimum(shape, (c + r).astype(int) + 1)
        zz, y2, x2 = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        ball = (zz - c[0]) ** 2 + (y2 - c[1]) ** 2 + (x2 - c[2]) ** 2 <= r**2
        vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][ball] += int(rng.choice([60, 300, 700]))
    return vol


def _child(args: argparse.Namespace) -> None:
    """Child process: one prediction; prints a JSON row."""
    import torch

    from medseg.inference import EnsembleMember, Predictor, predict_folder

    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    plan = _plan(args.classes, tuple(args.spacing), tuple(args.patch))
    torch.manual_seed(0)
    net = plan.configuration("3d_fullres").network("unet")
    model = net.build(1, plan.num_classes).eval()
    max_ram = None if args.max_ram == "none" else (args.max_ram if args.max_ram == "auto" else float(args.max_ram))
    predictor = Predictor([EnsembleMember(model, plan, "3d_fullres", "unet")], use_tta=args.tta, max_ram_gb=max_ram)
    res = predict_folder(args.input, args.output, predictor, progress=False, overwrite=True)
    record = next(iter(res.records.values()), None)
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - t0,
                "maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                "failed": res.failed,
                "memory": None if record is None else record.memory,
            }
        )
    )


def _run(case_dir: Path, out: Path, classes: int, spacing, patch, max_ram: str, tta: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", "--input", str(case_dir), "--output", str(out)]
    cmd += ["--classes", str(classes), "--max-ram", max_ram, "--spacing", *map(str, spacing)]
    cmd += ["--patch", *map(str, patch)] + (["--tta"] if tta else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _labels(out: Path) -> np.ndarray:
    files = [f for f in sorted(out.iterdir()) if f.name.endswith(".nii.gz")]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(files[0])))


def _bench_case(name, case_dir: Path, tmp: Path, classes, spacing, patch, budgets, ttas) -> list[dict]:
    """Run every budget (``"none"`` among them) with and without TTA; labels compared with the ``none`` run."""
    rows = []
    for tta in ttas:
        outs = {}
        for budget in budgets:
            out = outs[budget] = tmp / f"out_{name}_{budget}_{int(tta)}"
            row = _run(case_dir, out, classes, spacing, patch, budget, tta)
            mem = row["memory"] or {}
            rows.append(
                {
                    "case": name,
                    "tta": tta,
                    "max_ram": budget,
                    "seconds": round(row["seconds"], 1),
                    "peak_rss_gb": round(row["maxrss_gb"], 2),
                    "streamed": mem.get("streamed"),
                    "estimated_gb": mem.get("estimated_peak_gb"),
                    "streamed_estimate_gb": mem.get("streamed_peak_gb"),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        reference = _labels(outs["none"])
        for r in rows[-len(budgets) :]:
            r["differing_voxels"] = int((_labels(outs[r["max_ram"]]) != reference).sum())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("synthetic", "shared", "child"))
    ap.add_argument("--scale", type=float, default=1.0, help="synthetic: shape 400x512x512 times this")
    ap.add_argument("--classes", type=int, default=118)
    ap.add_argument("--max-ram", default="4", help="the budget run's --max-ram (GB)")
    ap.add_argument("--tta", action="store_true", help="synthetic: TTA on (default off); shared: both")
    ap.add_argument(
        "--cases", nargs="+", choices=("totalseg_ct", "voxelmorph"), default=("totalseg_ct", "voxelmorph"),
        help="shared: which cases (default both)",
    )  # fmt: skip
    ap.add_argument("--shared-tta", choices=("both", "off", "on"), default="both", help="shared: TTA runs")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder instead of a temporary one")
    ap.add_argument("--input", type=Path)
    ap.add_argument("--output", type=Path)
    ap.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 1.5))
    ap.add_argument("--patch", type=int, nargs=3, default=(64, 64, 64))
    args = ap.parse_args()
    if args.mode == "child":
        _child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_mem_", dir=args.keep) as t:
        tmp = Path(t)
        rows: list[dict] = []
        if args.mode == "synthetic":
            shape = tuple(int(round(n * args.scale)) for n in (400, 512, 512))
            case_dir = tmp / "in"
            case_dir.mkdir()
            img = sitk.GetImageFromArray(ct_like_volume(shape))  # type: ignore[arg-type]
            img.SetSpacing((0.8, 0.8, 1.5))
            sitk.WriteImage(img, str(case_dir / "ct_0000.nii.gz"))
            del img
            ttas = [True] if args.tta else [False]
            rows += _bench_case(
                f"synthetic {'x'.join(map(str, shape))}", case_dir, tmp, args.classes, (1.5, 1.5, 1.5),
                (64, 64, 64), [args.max_ram, "none"], ttas,
            )  # fmt: skip
        else:
            for name, sub, case in (
                ("totalseg_ct", "totalseg_ct", "example_ct"),
                ("voxelmorph", "voxelmorph_brain", None),
            ):
                if name not in args.cases:
                    continue
                src = SHARED / sub
                labels = json.loads((src / "dataset.json").read_text())["labels"]
                images = sorted((src / "imagesTr").glob("*.nii.gz"))
                image = next(p for p in images if case is None or p.name == case + ".nii.gz")
                case_dir = tmp / f"in_{name}"
                case_dir.mkdir()
                (case_dir / image.name).symlink_to(image.resolve())
                spacing = tuple(reversed(sitk.ReadImage(str(image)).GetSpacing()))
                rows += _bench_case(
                    name, case_dir, tmp, len(labels), spacing, (64, 64, 64), [args.max_ram, "auto", "none"],
                    {"both": [False, True], "off": [False], "on": [True]}[args.shared_tta],
                )  # fmt: skip
        print(
            "\n| case | TTA | --max-ram | streamed | seconds | peak RSS GB | estimate GB (streamed) | voxels differing |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['case']} | {'on' if r['tta'] else 'off'} | {r['max_ram']} | {r['streamed']} | {r['seconds']} "
                f"| {r['peak_rss_gb']} | {r['estimated_gb']} ({r['streamed_estimate_gb']}) | {r['differing_voxels']} |"
            )


if __name__ == "__main__":
    main()
