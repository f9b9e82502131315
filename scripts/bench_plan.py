"""Benchmark: `medseg plan` (fingerprint + plan + preprocess) against `nnUNetv2_plan_and_preprocess`.

Times medseg's library calls on a dataset (default: the shared hippocampus data, 200 cases) for the
``2d`` and ``3d_fullres`` configurations and, when nnU-Net v2 is installed, runs
``nnUNetv2_plan_and_preprocess -d ID -c 2d 3d_fullres`` on a converted copy of the same data in a
temporary folder (nnUNet_raw / nnUNet_preprocessed / nnUNet_results pointed there), with the same number
of worker processes. Prints both wall times, their ratio and the two 3d_fullres plans side by side.

nnU-Net is optional. Install it into its own environment (it may change torch), e.g.::

    python3 -m venv /work/nnunet_venv
    /work/nnunet_venv/bin/pip install torch==2.13.0 && /work/nnunet_venv/bin/pip install nnunetv2
    python scripts/bench_plan.py --nnunet-bin-dir /work/nnunet_venv/bin

Nothing is written next to the input data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"
NNUNET_DATASET_ID = 987


def run_medseg(data: Path, work: Path, num_workers: int, gpu_memory_gb: float) -> dict:
    from medseg.fingerprint import extract_fingerprint
    from medseg.io.dataset import load_dataset
    from medseg.io.validation import validate_dataset
    from medseg.io.workdir import WorkDir
    from medseg.planning.planner import PlannerOptions, plan_dataset
    from medseg.preprocessing import preprocess_dataset

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    ds = load_dataset(data)
    validate_dataset(ds, num_workers=num_workers)
    times["load + validate"] = time.perf_counter() - t0

    t = time.perf_counter()
    fp = extract_fingerprint(ds, num_workers=num_workers)
    fp.save(WorkDir(work).fingerprint)
    times["fingerprint"] = time.perf_counter() - t

    t = time.perf_counter()
    plan = plan_dataset(ds, fp, PlannerOptions(gpu_memory_gb=gpu_memory_gb))
    plan.save(WorkDir(work).plans)
    times["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    configs = [c for c in ("2d", "3d_fullres") if c in plan.configurations]
    preprocess_dataset(ds, plan, work, configs=configs, num_workers=num_workers)
    times["preprocess"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    full = plan.configuration("3d_fullres") if "3d_fullres" in plan.configurations else plan.configuration()
    net = full.network()
    summary = {
        "spacing": [round(s, 4) for s in full.spacing],
        "patch_size": list(full.patch_size),
        "batch_size": full.batch_size,
        "strides": [list(s) for s in net.strides],
    }
    return {"times": times, "plan": summary, "num_cases": len(ds.cases)}


def _find_nnunet(bin_dir: str | None) -> Path | None:
    name = "nnUNetv2_plan_and_preprocess"
    if bin_dir:
        exe = Path(bin_dir) / name
        return exe if exe.is_file() else None
    found = shutil.which(name)
    return Path(found) if found else None


def convert_to_nnunet(data: Path, raw_root: Path) -> Path:
    """Write an nnU-Net v2 raw dataset (links to the original files, `_0000` naming) under ``raw_root``."""
    from medseg.io.dataset import load_dataset

    ds = load_dataset(data)
    out = raw_root / f"Dataset{NNUNET_DATASET_ID:03d}_{''.join(ch for ch in ds.name if ch.isalnum()) or 'Bench'}"
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    ending = ds.file_ending
    for case in ds.cases:
        for c, src in enumerate(case.image_files):
            os.symlink(Path(src).resolve(), out / "imagesTr" / f"{case.case_id}_{c:04d}{ending}")
        if case.label_file is not None:
            os.symlink(Path(case.label_file).resolve(), out / "labelsTr" / f"{case.case_id}{ending}")
    meta = {
        "channel_names": {str(i): n for i, n in enumerate(ds.channel_names)},
        "labels": {n: int(i) for n, i in zip(ds.label_names, ds.label_ids)},
        "numTraining": len(ds.cases),
        "file_ending": ending,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out


def run_nnunet(exe: Path, data: Path, tmp: Path, num_workers: int, gpu_memory_gb: float) -> dict:
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp / var).mkdir(parents=True)
        env[var] = str(tmp / var)
    raw = convert_to_nnunet(data, tmp / "nnUNet_raw")
    cmd = [
        str(exe),
        "-d",
        str(NNUNET_DATASET_ID),
        "-c",
        "2d",
        "3d_fullres",
        "-npfp",
        str(num_workers),
        "-np",
        str(num_workers),
        str(num_workers),
        "-gpu_memory_target",
        str(gpu_memory_gb),
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    plans = json.loads((tmp / "nnUNet_preprocessed" / raw.name / "nnUNetPlans.json").read_text())
    full = plans["configurations"]["3d_fullres"]
    summary = {
        "spacing": [round(s, 4) for s in full["spacing"]],
        "patch_size": full["patch_size"],
        "batch_size": full["batch_size"],
        "strides": full["architecture"]["arch_kwargs"]["strides"],
        "transpose_forward": plans["transpose_forward"],
    }
    return {"wall": wall, "plan": summary, "command": " ".join(cmd)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (MSD or nnU-Net v2 layout)")
    parser.add_argument("--num-workers", type=int, default=2, help="worker processes for both tools")
    parser.add_argument("--gpu-memory-gb", type=float, default=8.0)
    parser.add_argument("--nnunet-bin-dir", default=None, help="folder holding nnUNetv2_plan_and_preprocess")
    parser.add_argument("--skip-nnunet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if not args.data.is_dir():
        print(f"error: {args.data}: dataset folder not found", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmpdir:
        tmp = Path(tmpdir)
        ours = run_medseg(args.data, tmp / "medseg_work", args.num_workers, args.gpu_memory_gb)
        theirs = None
        exe = None if args.skip_nnunet else _find_nnunet(args.nnunet_bin_dir)
        if exe is not None:
            theirs = run_nnunet(exe, args.data, tmp / "nnunet", args.num_workers, args.gpu_memory_gb)

    print(f"\nbench_plan: {args.data} ({ours['num_cases']} cases), {args.num_workers} workers, {os.cpu_count()} CPUs")
    print(f"{'stage':<22}{'medseg (s)':>12}")
    for k, v in ours["times"].items():
        print(f"{k:<22}{v:>12.2f}")
    print()
    print(f"{'':<22}{'medseg':>12}{'nnU-Net':>12}{'ratio':>10}")
    m = ours["times"]["total"]
    if theirs is not None:
        print(f"{'plan+preprocess (s)':<22}{m:>12.2f}{theirs['wall']:>12.2f}{m / theirs['wall']:>10.2f}")
    else:
        print(f"{'plan+preprocess (s)':<22}{m:>12.2f}{'-':>12}{'-':>10}")
    print("\n3d_fullres plan:")
    print(f"  medseg : {ours['plan']}")
    if theirs is not None:
        print(f"  nnU-Net: {theirs['plan']}")
        print(f"  nnU-Net command: {theirs['command']}")
    else:
        hint = f" in {args.nnunet_bin_dir}" if args.nnunet_bin_dir else " on PATH"
        print(
            f"\nnnUNetv2_plan_and_preprocess not found{hint}; to compare, install nnU-Net v2 in its own "
            "environment:\n  python3 -m venv /work/nnunet_venv && /work/nnunet_venv/bin/pip install torch==2.13.0 "
            "&& /work/nnunet_venv/bin/pip install nnunetv2\n  then: python scripts/bench_plan.py --nnunet-bin-dir "
            "/work/nnunet_venv/bin"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
