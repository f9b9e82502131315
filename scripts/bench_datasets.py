"""Every kind of dataset, end to end on this machine: plan, a short fixed-budget train, predict, score.

For each dataset: a copy in a temporary folder (the shared data is read-only) or a generated look-alike;
with more than one case the last case is held back. Then, each command in a fresh process:

1. ``medseg plan DATA -o WORK --device cpu --time-budget M`` (the plan a CPU user gets),
2. ``medseg train WORK --fold all --time-budget M --no-validation`` (every case except the held-back one),
3. ``medseg predict -i HELD_BACK -o PRED -m WORK`` (TTA on; the single-case sets predict their only case,
   which was trained on, so no Dice is reported for them),

and prints one table: plan seconds, the chosen 3d_fullres plan (spacing, patch, batch, mirror axes),
iterations trained, predict seconds, the peak resident memory of each command, and the Dice of the
held-back case (mean over the foreground classes in its reference; per class in the log).

    python scripts/bench_datasets.py                       # all datasets, 3 minutes each (~45 min)
    python scripts/bench_datasets.py --datasets tumour voxelmorph_brain --minutes 2

Datasets: ``hippocampus``, ``totalseg_ct`` (its two cases overlap: ``example_ct_sm`` is the first 30
slices of ``example_ct``, so its Dice is not independent), ``totalseg_mr``, ``voxelmorph_brain``, and the
generated ``tumour`` (6 cases, 155x240x240, 1 mm, 4 channels, 4 sub-regions), ``multichannel`` (10
tumour-like cases of 64x96x96 with 4 channels) and ``anisotropic`` (8 cases, 24x160x160 at 6.5 x 0.78 x
0.78 mm) from :mod:`medseg.io.synthetic_kinds`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = ("hippocampus", "totalseg_ct", "totalseg_mr", "voxelmorph_brain")
GENERATED = ("tumour", "multichannel", "anisotropic")
DATASETS = REAL + GENERATED

# a child's peak RSS: run the command in a small wrapper process that reports RUSAGE_CHILDREN
_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(rc)"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--minutes", type=float, default=3.0, help="time budget of plan and train (default 3)")
    p.add_argument("--root", default=None, help="folder for copies, work folders and logs (default: a temp dir)")
    return p.parse_args(argv)


def generate(name: str, dst: Path) -> Path:
    from medseg.io.synthetic_kinds import generate_anisotropic_dataset, generate_tumour_dataset

    if name == "tumour":
        return generate_tumour_dataset(dst, num_cases=6, shape=(155, 240, 240), num_channels=4)
    if name == "multichannel":
        return generate_tumour_dataset(dst, num_cases=10, shape=(64, 96, 96), num_channels=4, seed=1)
    return generate_anisotropic_dataset(dst, num_cases=8, shape=(24, 160, 160))


def _case_files(data: Path, case_id: str) -> tuple[list[Path], Path]:
    images = sorted((data / "imagesTr").glob(f"{case_id}_[0-9][0-9][0-9][0-9].nii.gz")) or [
        data / "imagesTr" / f"{case_id}.nii.gz"
    ]
    return images, data / "labelsTr" / f"{case_id}.nii.gz"


def split_off_last_case(data: Path, held: Path) -> tuple[list[Path], Path] | None:
    """Move the last case (sorted by id) of ``data`` into ``held``; None for a single-case dataset."""
    from medseg.io.dataset import load_dataset

    ds = load_dataset(data)
    if len(ds.cases) < 2:
        return None
    last = sorted(ds.cases, key=lambda c: c.case_id)[-1]
    held.mkdir(parents=True)
    images = [Path(shutil.move(str(p), held / p.name)) for p in last.image_files]
    label = Path(shutil.move(str(last.label_file), held / f"label_{last.label_file.name}"))
    meta_path = data / "dataset.json"
    meta = json.loads(meta_path.read_text())
    if isinstance(meta.get("training"), list):
        meta["training"] = [
            e
            for e in meta["training"]
            if Path(str(e.get("label", "") if isinstance(e, dict) else e)).name != last.label_file.name
        ]
        meta["numTraining"] = len(meta["training"])
    elif "numTraining" in meta:
        meta["numTraining"] = int(meta["numTraining"]) - 1
    meta_path.write_text(json.dumps(meta, indent=1))
    return images, label


def run(args: list[str], log: Path) -> tuple[int, float, float]:
    """``medseg ARGS`` in a fresh process: (exit status, wall seconds, peak RSS in GB)."""
    t = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ medseg {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run(
            [sys.executable, "-c", _WRAPPER, sys.executable, "-m", "medseg", *args],
            stdout=f,
            stderr=subprocess.PIPE,
            text=True,
        )
    wall = time.perf_counter() - t
    rss = float("nan")
    with log.open("a") as f:
        for line in proc.stderr.splitlines():
            if line.startswith("MAXRSS_KB"):
                rss = int(line.split()[1]) * 1024 / 1e9
            else:
                f.write(line + "\n")
    return proc.returncode, wall, rss


def dice_per_class(pred: np.ndarray, ref: np.ndarray) -> dict[int, float]:
    """Dice of every foreground id present in ``ref``."""
    out = {}
    for k in np.unique(ref):
        if k == 0:
            continue
        p, r = pred == k, ref == k
        out[int(k)] = float(2.0 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))
    return out


def bench(name: str, root: Path, minutes: float) -> dict:
    import SimpleITK as sitk

    from medseg.io.workdir import WorkDir

    log = root / f"{name}.log"
    data = root / "data" / name
    if data.exists():
        shutil.rmtree(data)
    if name in REAL:
        shutil.copytree(SHARED / name, data)
    else:
        generate(name, data)
    held = split_off_last_case(data, root / "held" / name)
    work, pred = root / "work" / name, root / "pred" / name
    for p in (work, pred):
        if p.exists():
            shutil.rmtree(p)
    row: dict = {"dataset": name}
    rc, row["plan_s"], row["plan_gb"] = run(
        ["plan", str(data), "-o", str(work), "--device", "cpu", "--time-budget", f"{minutes:g}"], log
    )
    if rc != 0:
        return {**row, "error": f"plan exited {rc} (see {log})"}
    plan = json.loads(WorkDir(work).plans.read_text())
    cfg = plan["configurations"]["3d_fullres"]
    net = cfg["networks"]["unet"]
    row.update(
        spacing=cfg["spacing"],
        patch=net["patch_size"],
        batch=net["batch_size"],
        mirror=cfg["mirror_axes"],
        features=net["spec"]["base_features"],
    )
    rc, row["train_s"], row["train_gb"] = run(
        ["train", str(work), "--fold", "all", "--time-budget", f"{minutes:g}", "--device", "cpu", "--no-validation"],
        log,
    )
    if rc != 0:
        return {**row, "error": f"train exited {rc} (see {log})"}
    progress = json.loads(WorkDir(work).run("3d_fullres", "unet", "all").progress.read_text())
    row["iterations"] = progress.get("iteration")
    inp = root / "pred_in" / name
    if inp.exists():
        shutil.rmtree(inp)
    inp.mkdir(parents=True)
    if held is not None:
        images, label = held
    else:
        case = sorted((data / "labelsTr").glob("*.nii.gz"))[0].name[: -len(".nii.gz")]
        images, label = _case_files(data, case)
    for p in images:
        shutil.copy(p, inp / p.name)
    rc, row["predict_s"], row["predict_gb"] = run(
        ["predict", "-i", str(inp), "-o", str(pred), "-m", str(work), "--device", "cpu"], log
    )
    if rc != 0:
        return {**row, "error": f"predict exited {rc} (see {log})"}
    if held is not None:
        out = sorted(pred.glob("*.nii.gz"))[0]
        per_class = dice_per_class(
            sitk.GetArrayFromImage(sitk.ReadImage(str(out))), sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
        )
        row["dice"] = float(np.mean(list(per_class.values()))) if per_class else float("nan")
        with log.open("a") as f:
            f.write(f"Dice per class of {out.name}: {per_class}\n")
    return row


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    if isinstance(v, list):
        return "x".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if v else "none"
    return "-" if v is None else str(v)


def print_table(rows: list[dict], minutes: float) -> None:
    cols = [
        ("dataset", "dataset"),
        ("plan_s", "plan s"),
        ("spacing", "spacing mm"),
        ("patch", "patch"),
        ("features", "feat"),
        ("batch", "batch"),
        ("mirror", "mirror"),
        ("train_s", "train s"),
        ("iterations", "iters"),
        ("predict_s", "predict s"),
        ("plan_gb", "plan GB"),
        ("train_gb", "train GB"),
        ("predict_gb", "predict GB"),
        ("dice", "Dice held-back"),
    ]
    print(f"\nbudget {minutes:g} min for plan and train; peak RSS per command; Dice of the held-back case")
    print("| " + " | ".join(h for _, h in cols) + " |")
    print("|" + "|".join(" --- " for _ in cols) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['dataset']} | {r['error']} |" + " |" * (len(cols) - 2))
            continue
        print(
            "| "
            + " | ".join(str(r.get(k)).replace(" ", "") if k == "mirror" else _fmt(r.get(k)) for k, _ in cols)
            + " |"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="medseg_bench_datasets_"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.datasets:
        print(f"== {name} (log: {root / (name + '.log')})", flush=True)
        rows.append(bench(name, root, args.minutes))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows, args.minutes)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
