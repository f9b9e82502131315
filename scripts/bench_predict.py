"""Benchmark prediction: time for N hippocampus cases with mirror TTA, and peak RAM for one large volume.

    python scripts/bench_predict.py [--data ../shared/data/hippocampus] [--run-dir WORK/runs/3d_fullres/unet/fold_0]
                                    [--num-cases 20] [--nnunet-model-folder DIR --nnunet-fold 0]

Without ``--run-dir`` the network is the planned architecture (``plans/hippocampus.json``, else the plan
``medseg plan`` produces for ``--data``) with random weights: speed and memory do not depend on the
weights (Dice does, so it is only reported for trained models). Each tool runs as its own process, timed
end to end (imports and model loading included), as wall time and as CPU time of its whole process tree
(the steadier figure on a shared machine). Peak memory is the sampled proportional set size (PSS)
of the tool's whole process tree, so nnU-Net's worker processes count too. The memory test predicts one
synthetic ``155 x 240 x 240`` (Z, Y, X; BraTS-sized) volume.

nnU-Net is run side by side when ``/work/nnunet_venv/bin/nnUNetv2_predict_from_modelfolder`` exists: with
``--nnunet-model-folder`` (a trained nnU-Net model folder), or else with a model folder the script builds
from nnU-Net's own fingerprint and plan of ``--data`` with random weights (timing and memory only);
without nnU-Net the script prints how to install it. Prints one table (medseg, nnU-Net, ratio).

``python scripts/bench_predict.py big ...`` runs ``scripts/bench_predict_big.py`` instead: ``medseg predict``
vs ``nnUNetv2_predict`` on the big many-class cases (totalseg_ct, voxelmorph_brain, a synthetic CT), each
tool with its own plan, TTA off and on (its docstring lists the options).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"
NNUNET_VENV = Path("/work/nnunet_venv")


def _plan_path(args: argparse.Namespace, tmp: Path) -> Path:
    """The plan file the random-weight network is built from (planned once, in the parent)."""
    preset = REPO / "plans" / "hippocampus.json"
    if preset.is_file() and Path(args.data).name == "hippocampus":
        return preset
    from medseg.pipeline import plan_and_preprocess

    return plan_and_preprocess(args.data, tmp / "work", num_workers=2, preprocess=False).plan_path


def _predictor(args: argparse.Namespace, **kwargs):
    import torch

    from medseg.inference import EnsembleMember, Predictor
    from medseg.planning.plan import Plan

    if args.run_dir:
        return Predictor.from_run_dir(args.run_dir, use_tta=not args.no_tta, **kwargs)
    plan = Plan.load(args.plan)
    cfg = plan.configuration()
    net = cfg.network()
    torch.manual_seed(0)
    model = net.build(plan.num_channels, plan.num_classes).eval()
    return Predictor([EnsembleMember(model, plan, cfg.name, net.arch)], use_tta=not args.no_tta, **kwargs)


def _link_cases(data: Path, n: int, dst: Path) -> None:
    images = sorted(
        p for p in (data / "imagesTr").iterdir() if p.name.endswith(".nii.gz") and not p.name.startswith(".")
    )
    dst.mkdir(parents=True)
    for p in images[:n]:
        os.symlink(p.resolve(), dst / p.name)


_CHANNELS_LAST = {"auto": None, "on": True, "off": False}


def _child(args: argparse.Namespace) -> None:
    """Child process: predict ``--input`` into ``--output`` with one medseg variant; print a JSON row."""
    from medseg.inference import predict_folder

    t0 = time.perf_counter()
    predictor = _predictor(args, channels_last=_CHANNELS_LAST[args.channels_last], compile=args.compile, step=args.step)
    m = predictor.members[0]
    net = m.plan.configuration(m.configuration).network(m.arch)
    res = predict_folder(args.input, args.output, predictor, num_workers=2, progress=False, overwrite=True)
    row = {
        "cases": len(res.written),
        "failed": len(res.failed),
        "predict_seconds": time.perf_counter() - t0,
        "model": f"{predictor.describe()}, patch {list(net.patch_size)}, features {list(net.features_per_stage())}",
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(row))


def _medseg(
    args: argparse.Namespace,
    tmp: Path,
    tag: str,
    input_dir: Path,
    *,
    tta: bool,
    step: float,
    channels_last: str = "auto",
    compile_: bool = False,
    evaluate: bool = True,
) -> dict:
    """Run one medseg variant as its own process (imports and model building included, like nnU-Net)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--data",
        args.data,
        "--input",
        str(input_dir),
        "--output",
        str(tmp / f"out_{tag}"),
        "--channels-last",
        channels_last,
        "--step",
        str(step),
    ]
    cmd += ["--run-dir", args.run_dir] if args.run_dir else ["--plan", str(args.plan)]
    cmd += [] if tta else ["--no-tta"]
    cmd += ["--compile"] if compile_ else []
    seconds, cpu, pss, out = _run_measured(cmd)
    row = {"name": f"medseg ({tag})", "seconds": seconds, "cpu": cpu, "peak_mb": pss, "cases": 0}
    if out.strip():
        child = json.loads(out.strip().splitlines()[-1])
        row.update(cases=child["cases"], peak_mb=max(pss, child["maxrss_mb"]), model=child["model"])
    if evaluate and args.run_dir and row["cases"]:
        row["dice"] = _dice(args, tmp / f"out_{tag}")
    return row


def _dice(args: argparse.Namespace, pred_dir: Path) -> float | None:
    """Mean foreground Dice of ``pred_dir`` against ``--data``'s labelsTr (None without labels)."""
    labels = Path(args.data) / "labelsTr"
    if not labels.is_dir():
        return None
    from medseg.evaluation import evaluate_folders

    return evaluate_folders(pred_dir, labels, progress=False)["foreground_mean"]["dice"]


def _big_volume(tmp: Path, shape: tuple[int, ...]) -> Path:
    import numpy as np
    import SimpleITK as sitk

    folder = tmp / "ram_in"
    folder.mkdir()
    arr = np.random.default_rng(0).normal(100, 20, shape).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(folder / "big.nii.gz"))
    return folder


def _tree_pss_mb(root: int) -> float:
    """Proportional set size (MB) of ``root`` and all its descendants (shared pages split fairly)."""
    total, todo, seen = 0.0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
                    break
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def _run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, str]:
    """Run ``cmd``; returns (wall seconds, CPU seconds of the whole process tree (user + system, every
    worker included), peak memory of the process tree in MB (PSS sampled every 50 ms), stdout).

    CPU seconds are the fairer speed measure on a shared machine: they barely change with other load.
    """
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _tree_pss_mb(proc.pid))
        time.sleep(0.05)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if proc.returncode != 0:
        print(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}", file=sys.stderr)
    return seconds, cpu, peak, out


# Run inside nnU-Net's venv: a model folder with nnU-Net's own 3d_fullres plan and random weights.
_NNUNET_SETUP = r"""
import json, os, sys, torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
pre, out = sys.argv[1], sys.argv[2]
plans = json.load(open(os.path.join(pre, "nnUNetPlans.json")))
ds = json.load(open(os.path.join(pre, "dataset.json")))
pm = PlansManager(plans)
cm = pm.get_configuration("3d_fullres")
k = pm.get_label_manager(ds).num_segmentation_heads
torch.manual_seed(0)
net = nnUNetTrainer.build_network_architecture(pm, cm, len(ds["channel_names"]), k, enable_deep_supervision=False)
os.makedirs(os.path.join(out, "fold_0"), exist_ok=True)
json.dump(plans, open(os.path.join(out, "plans.json"), "w"))
json.dump(ds, open(os.path.join(out, "dataset.json"), "w"))
torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": ds},
            "inference_allowed_mirroring_axes": (0, 1, 2)}, os.path.join(out, "fold_0", "checkpoint_final.pth"))
print(json.dumps({"patch_size": cm.patch_size, "features": cm.network_arch_init_kwargs.get("features_per_stage"),
                  "strides": cm.network_arch_init_kwargs.get("strides")}))
"""


def _nnunet_random_model(data: Path, tmp: Path) -> tuple[Path, dict, dict]:
    """nnU-Net fingerprint + plan of ``data`` and a random-weight 3d_fullres model folder (for timing only)."""
    meta = json.loads((data / "dataset.json").read_text())
    raw = tmp / "nnUNet_raw" / "Dataset987_Bench"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    n = 0
    for p in sorted((data / "labelsTr").iterdir()):
        if p.name.endswith(".nii.gz") and not p.name.startswith("."):
            os.symlink(p.resolve(), raw / "labelsTr" / p.name)
            image = (data / "imagesTr" / p.name).resolve()
            os.symlink(image, raw / "imagesTr" / p.name.replace(".nii.gz", "_0000.nii.gz"))
            n += 1
    labels = meta["labels"]
    if all(str(k).isdigit() for k in labels):  # MSD: id -> name
        labels = {name: int(i) for i, name in labels.items()}
    channels = meta.get("channel_names") or meta.get("modality")
    (raw / "dataset.json").write_text(
        json.dumps({"channel_names": channels, "labels": labels, "numTraining": n, "file_ending": ".nii.gz"})
    )
    env = dict(
        os.environ,
        nnUNet_raw=str(tmp / "nnUNet_raw"),
        nnUNet_preprocessed=str(tmp / "nnUNet_preprocessed"),
        nnUNet_results=str(tmp / "nnUNet_results"),
    )
    bin_ = NNUNET_VENV / "bin"
    for cmd in (
        [str(bin_ / "nnUNetv2_extract_fingerprint"), "-d", "987", "-np", "2"],
        [str(bin_ / "nnUNetv2_plan_experiment"), "-d", "987"],
    ):
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    model = tmp / "nnUNet_results" / "Dataset987_Bench" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    pre = tmp / "nnUNet_preprocessed" / "Dataset987_Bench"
    out = subprocess.run(
        [str(bin_ / "python"), "-c", _NNUNET_SETUP, str(pre), str(model)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return model, json.loads(out.stdout.strip().splitlines()[-1]), env


def _nnunet_setup(args: argparse.Namespace, tmp: Path) -> tuple[Path, dict | None] | None:
    exe = NNUNET_VENV / "bin" / "nnUNetv2_predict_from_modelfolder"
    if exe.exists() and not args.nnunet_model_folder and not args.run_dir:
        print("building an nnU-Net model folder (nnU-Net's own plan, random weights) ...", flush=True)
        model, topo, env = _nnunet_random_model(Path(args.data), tmp)
        print(f"  nnU-Net 3d_fullres: patch {topo['patch_size']}, features {topo['features']}", flush=True)
        return model, env
    if exe.exists() and args.nnunet_model_folder:
        return Path(args.nnunet_model_folder), None
    print(
        "\nnnU-Net comparison skipped. To run it side by side:\n"
        f"  python -m venv {NNUNET_VENV} && {NNUNET_VENV}/bin/pip install nnunetv2\n"
        "  then rerun (random weights, nnU-Net's own plan), or pass a trained model folder with\n"
        "  --nnunet-model-folder nnUNet_results/DatasetXXX_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres "
        "--nnunet-fold 0"
    )
    return None


def _nnunet(
    args: argparse.Namespace,
    tmp: Path,
    model: Path,
    env: dict | None,
    tag: str,
    input_dir: Path,
    *,
    tta: bool,
    step: float,
    workers: int,
    evaluate: bool = True,
) -> dict:
    nn_in = tmp / f"nn_in_{tag}"
    nn_in.mkdir()
    for p in sorted(input_dir.iterdir()):
        os.symlink(p.resolve(), nn_in / p.name.replace(".nii.gz", "_0000.nii.gz"))
    cmd = [
        str(NNUNET_VENV / "bin" / "nnUNetv2_predict_from_modelfolder"),
        "-i",
        str(nn_in),
        "-o",
        str(tmp / f"nn_out_{tag}"),
        "-m",
        str(model),
        "-f",
        str(args.nnunet_fold),
        "-device",
        "cpu",
        "-npp",
        str(workers),
        "-nps",
        str(workers),
        "-step_size",
        str(step),
    ]
    cmd += [] if tta else ["--disable_tta"]
    seconds, cpu, pss, _ = _run_measured(cmd, env=env)
    row = {
        "name": f"nnU-Net v2 ({tag})",
        "seconds": seconds,
        "cpu": cpu,
        "peak_mb": pss,
        "cases": len(list((tmp / f"nn_out_{tag}").glob("*.nii.gz"))),
    }
    if evaluate and args.nnunet_model_folder and row["cases"]:
        row["dice"] = _dice(args, tmp / f"nn_out_{tag}")
    return row


def _print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"  {'':26s} {'wall (s)':>9s} {'CPU (s)':>9s} {'CPU s/case':>10s} {'peak RAM (MB)':>13s} {'Dice':>7s}")
    for r in rows:
        dice = f"{r['dice']:.4f}" if r.get("dice") is not None else "-"
        print(
            f"  {r['name']:26s} {r['seconds']:9.1f} {r['cpu']:9.1f} {r['cpu'] / max(r['cases'], 1):10.2f} "
            f"{r['peak_mb']:13.0f} {dice:>7s}"
        )
    med = rows[0]
    for r in rows[1:]:
        if r["name"].startswith("nnU-Net"):
            print(
                f"  ratio nnU-Net / medseg: wall {r['seconds'] / med['seconds']:.2f}x, CPU time "
                f"{r['cpu'] / max(med['cpu'], 1e-9):.2f}x; medseg peak RAM = "
                f"{med['peak_mb'] / max(r['peak_mb'], 1e-9):.2f}x nnU-Net's"
            )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["big"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_predict_big import main as big_main

        return big_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--run-dir", default=None, help="trained run folder (default: random weights, planned size)")
    p.add_argument("--num-cases", type=int, default=20)
    p.add_argument("--no-tta", action="store_true")
    p.add_argument(
        "--variants", action="store_true", help="also time contiguous vs channels-last memory format and torch.compile"
    )
    p.add_argument("--ram-shape", type=int, nargs=3, default=[155, 240, 240], metavar=("Z", "Y", "X"))
    p.add_argument("--ram-tta", action="store_true", help="mirror TTA in the large-volume run (slow on CPU)")
    p.add_argument(
        "--ram-step",
        type=float,
        default=1.0,
        help="sliding-window step of the large-volume run (default 1.0 to keep it short; peak memory "
        "does not depend on it)",
    )
    p.add_argument("--skip-ram", action="store_true")
    p.add_argument("--skip-nnunet", action="store_true")
    p.add_argument("--nnunet-model-folder", default=None)
    p.add_argument("--nnunet-fold", default="0")
    # child-process options
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    p.add_argument("--input", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output", default=None, help=argparse.SUPPRESS)
    p.add_argument("--channels-last", choices=sorted(_CHANNELS_LAST), default="auto", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--step", type=float, default=0.5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="medseg_bench_predict_"))
    try:
        if not args.run_dir:
            args.plan = _plan_path(args, tmp)
        _link_cases(Path(args.data), args.num_cases, tmp / "in")
        print(
            f"{args.num_cases} cases from {args.data}; torch {torch.__version__}, {os.cpu_count()} CPUs; "
            f"TTA {'off' if args.no_tta else 'on (8 mirrorings)'}; each tool timed as a whole process",
            flush=True,
        )
        tta = not args.no_tta
        rows = [_medseg(args, tmp, "default", tmp / "in", tta=tta, step=0.5)]
        print(f"  medseg network: {rows[0].get('model')}", flush=True)
        if args.variants:
            rows.append(_medseg(args, tmp, "contiguous", tmp / "in", tta=tta, step=0.5, channels_last="off"))
            rows.append(_medseg(args, tmp, "channels-last", tmp / "in", tta=tta, step=0.5, channels_last="on"))
            rows.append(_medseg(args, tmp, "compiled", tmp / "in", tta=tta, step=0.5, compile_=True))
        nn = None if args.skip_nnunet else _nnunet_setup(args, tmp)
        if nn:
            rows.append(_nnunet(args, tmp, nn[0], nn[1], "cases", tmp / "in", tta=tta, step=0.5, workers=2))
        _print_table(f"{args.num_cases} cases, TTA {'on' if tta else 'off'}, step 0.5", rows)

        if not args.skip_ram:
            big = _big_volume(tmp, tuple(args.ram_shape))
            ram_rows = [_medseg(args, tmp, "large", big, tta=args.ram_tta, step=args.ram_step, evaluate=False)]
            if nn:
                ram_rows.append(
                    _nnunet(
                        args,
                        tmp,
                        nn[0],
                        nn[1],
                        "large",
                        big,
                        tta=args.ram_tta,
                        step=args.ram_step,
                        workers=1,
                        evaluate=False,
                    )
                )
            shape = " x ".join(map(str, args.ram_shape))
            _print_table(
                f"one {shape} (Z, Y, X) volume, TTA {'on' if args.ram_tta else 'off'}, step {args.ram_step}", ram_rows
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
