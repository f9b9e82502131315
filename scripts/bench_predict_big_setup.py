"""Setup of ``bench_predict_big.py``: each case's data, plans and models for medseg and nnU-Net v2.

Everything is written under one folder per case and kept: a step whose result exists is skipped, so a
rerun of the benchmark measures again without planning again. Not measured, not part of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_nnunet import (  # noqa: E402
    _atomic_write_text,
    _copy_or_convert,
    _dataset_folder_name,
    _parse_labels,
    nnunet_label_ids,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
NNUNET_ID = 986
NNUNET_CONFIG = "3d_fullres"
# shared cases: dataset folder and the one image predicted
SHARED_CASES = {"totalseg": ("totalseg_ct", "example_ct"), "voxelmorph": ("voxelmorph_brain", "test_scan")}
SYNTHETIC_CASE = "synthetic_ct"
_READY = ".bench_ready"


def _run_setup(cmd: list[str], env: dict[str, str], log: Path) -> None:
    """Run a setup command (not measured); raises with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({rc}):\n{log.read_text(errors='replace')[-3000:]}")


# ----------------------------------------------------------------------------------------- cases


def write_synthetic_dataset(folder: Path, scale: float, classes: int) -> Path:
    """A one-case dataset (``imagesTr/synthetic_ct.nii.gz``, ``labelsTr/``, ``dataset.json``) of a CT-like volume.

    The image is ``bench_predict_memory.ct_like_volume`` of ``(400, 512, 512) x scale`` (Z, Y, X) at
    0.8 x 0.8 x 1.5 mm (x, y, z), int16 HU. The label map gives the body (HU > -500) ids 1..classes-1 by
    a 5 x 5 x 5 grid of blocks (block index mod (classes - 1), plus 1): every id occurs when classes <= 126.

    Returns:
        The dataset folder.
    """
    import numpy as np
    import SimpleITK as sitk
    from bench_predict_memory import ct_like_volume

    shape = tuple(max(8, int(round(n * scale))) for n in (400, 512, 512))
    vol = ct_like_volume(shape)  # type: ignore[arg-type]
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    block = (z * 5 // shape[0]) * 25 + (y * 5 // shape[1]) * 5 + (x * 5 // shape[2])
    labels = np.where(vol > -500, 1 + block % (classes - 1), 0).astype(np.uint8 if classes <= 256 else np.uint16)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for sub, arr in (("imagesTr", vol), ("labelsTr", labels)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.8, 0.8, 1.5))
        sitk.WriteImage(img, str(folder / sub / "synthetic_ct.nii.gz"), useCompression=True)
    meta = {
        "name": "SyntheticCT",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{f"class_{i}": i for i in range(1, classes)}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    _atomic_write_text(folder / "dataset.json", json.dumps(meta, indent=1))
    return folder


def prediction_input(data: Path, case: str, folder: Path) -> Path:
    """``folder/CASE_0000.nii.gz``, a link to ``data/imagesTr/CASE.nii.gz`` (a name both tools read)."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / f"{case}_0000.nii.gz"
    if not link.exists():
        link.symlink_to((data / "imagesTr" / f"{case}.nii.gz").resolve())
    return folder


def nnunet_raw(data: Path, raw_root: Path, dataset_id: int = NNUNET_ID) -> Path:
    """Every labelled case of the one-channel dataset ``data`` in nnU-Net v2's raw layout; returns its folder.

    ``raw_root/DatasetNNN_Name/imagesTr/CASE_0000.nii.gz`` links to ``data/imagesTr/CASE.nii.gz`` (or
    ``CASE_0000.nii.gz``); ``labelsTr/CASE.nii.gz`` is a copy with label ids renumbered to 0..K-1 where
    ``dataset.json`` declares ids with gaps (nnU-Net needs consecutive ids; the header, so the geometry,
    is kept); ``dataset.json`` has the renumbered labels. One-case datasets are fine (nnU-Net plans them).

    Raises:
        ValueError: more than one channel, no labelled case, or a case without its image.
    """
    meta_path = data / "dataset.json"
    meta = json.loads(meta_path.read_text())
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "image"}
    if len(channels) != 1:
        raise ValueError(f"{meta_path}: {len(channels)} channels; the benchmark cases have one")
    labels = _parse_labels(meta, meta_path)
    lut = nnunet_label_ids(labels)
    out = raw_root / _dataset_folder_name(dataset_id, str(meta.get("name") or data.name))
    shutil.rmtree(out, ignore_errors=True)
    (out / "imagesTr").mkdir(parents=True)
    cases = sorted(
        p.name[: -len(".nii.gz")]
        for p in (data / "labelsTr").iterdir()
        if p.name.endswith(".nii.gz") and not p.name.startswith(".")
    )
    if not cases:
        raise ValueError(f"{data / 'labelsTr'}: no labelled case")
    for cid in cases:
        image = next(
            (i for i in (data / "imagesTr" / f"{cid}.nii.gz", data / "imagesTr" / f"{cid}_0000.nii.gz") if i.is_file()),
            None,
        )
        if image is None:
            raise ValueError(f"{data / 'imagesTr'}: no image for labelled case {cid}")
        (out / "imagesTr" / f"{cid}_0000.nii.gz").symlink_to(image.resolve())
        _copy_or_convert(data / "labelsTr" / f"{cid}.nii.gz", out / "labelsTr" / f"{cid}.nii.gz", lut)
    ds = {
        "name": str(meta.get("name") or data.name),
        "channel_names": {"0": str(next(iter(channels.values())))},
        "labels": {name: lut[i] for name, i in sorted(labels.items(), key=lambda kv: kv[1])},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    _atomic_write_text(out / "dataset.json", json.dumps(ds, indent=1))
    return out


# What `medseg train WORK --fold all --epochs 1 --iters-per-epoch 1 --no-validation --device cpu` does,
# without the per-epoch pseudo Dice (20 batches of forward passes: minutes on a loaded CPU, for nothing here).
_MEDSEG_ONE_ITERATION = r"""
import sys
from pathlib import Path
from medseg.pipeline import record_postprocessing_prior
from medseg.training import TrainConfig, train
work = Path(sys.argv[1])
cfg = TrainConfig(fold="all", epochs=1, iters_per_epoch=1, val_iters=0, final_validation=False, device="cpu",
                  num_workers=1)
record_postprocessing_prior(work, train(work, cfg), "all")
"""


# Run with nnU-Net's python: a 3d_fullres model folder with the network as initialised (seed 0).
_NNUNET_INIT_MODEL = r"""
import json, os, sys, torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
pre, out, config = sys.argv[1], sys.argv[2], sys.argv[3]
plans = json.load(open(os.path.join(pre, "nnUNetPlans.json")))
ds = json.load(open(os.path.join(pre, "dataset.json")))
pm = PlansManager(plans)
cm = pm.get_configuration(config)
heads = pm.get_label_manager(ds).num_segmentation_heads
torch.manual_seed(0)
net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                             cm.network_arch_init_kwargs_req_import, len(ds["channel_names"]), heads,
                             allow_init=True, deep_supervision=False)
os.makedirs(os.path.join(out, "fold_0"), exist_ok=True)
json.dump(plans, open(os.path.join(out, "plans.json"), "w"))
json.dump(ds, open(os.path.join(out, "dataset.json"), "w"))
torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
            "init_args": {"plans": plans, "configuration": config, "fold": 0, "dataset_json": ds},
            "inference_allowed_mirroring_axes": tuple(range(len(cm.patch_size)))},
           os.path.join(out, "fold_0", "checkpoint_final.pth"))
"""


def nnunet_network(plans: dict, config: str = NNUNET_CONFIG) -> str:
    """``patch [..], features [..]`` of nnU-Net's plan (``nnUNetPlans.json`` as a dict)."""
    c = plans["configurations"][config]
    feats = c.get("architecture", {}).get("arch_kwargs", {}).get("features_per_stage")
    return f"patch {c['patch_size']}, batch {c['batch_size']}, features {feats}"


def medseg_network(plans: dict) -> str:
    """``CONFIG patch [..], features B..M, PRECISION`` of the default configuration of a medseg plan."""
    cfg = plans["configurations"][plans["default_configuration"]]
    net = cfg["networks"][cfg.get("default_arch") or "unet"]
    spec = net["spec"]
    return (
        f"{cfg['name']} patch {net['patch_size']}, features {spec['base_features']}..{spec['max_features']}, "
        f"{len(spec['strides'])} stages, {net.get('precision') or 'fp32'}"
    )


def tool_env(env: dict[str, str], threads: int) -> dict[str, str]:
    """``env`` with OpenMP and MKL limited to ``threads`` (the same for both tools)."""
    return {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


class CaseSetup:
    """The data, medseg work folders and nnU-Net model folder of one case, under ``folder``.

    Args:
        case: ``totalseg``, ``voxelmorph`` or ``synthetic``.
        folder: where this case's setup lives (created; reused when it is complete).
        args: the benchmark's options (plans, workers, budget minutes, synthetic scale, nnU-Net venv).
    """

    def __init__(self, case: str, folder: Path, args: argparse.Namespace):
        self.case, self.folder, self.args = case, folder, args
        self.data = self.input = Path()
        self.image_case = SYNTHETIC_CASE
        self.nnunet_model: Path | None = None
        self.nnunet_env: dict[str, str] = {}
        self.medseg_env = {**os.environ, "PYTHONPATH": str(REPO)}

    def prepare(self) -> None:
        """Write whatever is missing: the data (synthetic only), medseg's plans and models, nnU-Net's model."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.case in SHARED_CASES:
            sub, self.image_case = SHARED_CASES[self.case]
            self.data = SHARED / sub
        else:
            self.data = self.folder / "data"
            if not (self.data / _READY).exists():
                shutil.rmtree(self.data, ignore_errors=True)
                write_synthetic_dataset(self.data, self.args.synthetic_scale, self.args.synthetic_classes)
                (self.data / _READY).write_text("")
        self.input = prediction_input(self.data, self.image_case, self.folder / "in")
        for plan in self.args.plans:
            self._medseg(plan)
        if not self.args.skip_nnunet:
            self._nnunet()

    def _medseg(self, plan: str) -> None:
        work = self.folder / f"medseg_{plan}"
        if (work / _READY).exists():
            return
        shutil.rmtree(work, ignore_errors=True)
        medseg = [sys.executable, "-m", "medseg"]
        cmd = [*medseg, "plan", str(self.data), "-o", str(work), "--num-workers", str(self.args.workers)]
        if plan == "cpu-budget":
            cmd += ["--device", "cpu", "--time-budget", str(self.args.budget_minutes)]
        _run_setup(cmd, self.medseg_env, self.folder / "logs" / f"medseg_plan_{plan}.log")
        train = [sys.executable, "-c", _MEDSEG_ONE_ITERATION, str(work)]
        _run_setup(train, self.medseg_env, self.folder / "logs" / f"medseg_train_{plan}.log")
        (work / _READY).write_text("")

    def _nnunet(self) -> None:
        root = self.folder / "nnunet"
        self.nnunet_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            self.nnunet_env[var] = str(root / var)
        done = root / _READY
        if done.exists():
            self.nnunet_model = Path(done.read_text().strip())
            return
        bin_ = self.args.nnunet_venv / "bin"
        if not (bin_ / "nnUNetv2_predict").is_file():
            print(f"nnU-Net skipped: {bin_ / 'nnUNetv2_predict'} not found (see the docstring)", flush=True)
            return
        shutil.rmtree(root, ignore_errors=True)
        raw = nnunet_raw(self.data, root / "nnUNet_raw")
        logs = self.folder / "logs"
        ident, w = str(NNUNET_ID), str(self.args.workers)
        _run_setup(
            [str(bin_ / "nnUNetv2_extract_fingerprint"), "-d", ident, "-np", w], self.nnunet_env, logs / "nn_fp.log"
        )
        _run_setup([str(bin_ / "nnUNetv2_plan_experiment"), "-d", ident], self.nnunet_env, logs / "nn_plan.log")
        model = root / "nnUNet_results" / raw.name / f"nnUNetTrainer__nnUNetPlans__{NNUNET_CONFIG}"
        pre = root / "nnUNet_preprocessed" / raw.name
        cmd = [str(bin_ / "python"), "-c", _NNUNET_INIT_MODEL, str(pre), str(model), NNUNET_CONFIG]
        _run_setup(cmd, self.nnunet_env, logs / "nn_init_model.log")
        self.nnunet_model = model
        done.write_text(str(model))

    def predict_command(self, tool: str, tta: bool) -> tuple[list[str], dict[str, str], Path]:
        """(command, environment, output folder) of one prediction of this case's input folder.

        Args:
            tool: a medseg plan name (``default``, ``cpu-budget``) or ``nnU-Net``.
            tta: mirror test-time augmentation on.
        """
        w = str(self.args.workers)
        if tool == "nnU-Net":
            out = self.folder / f"out_nnunet_tta_{int(tta)}"
            cmd = [str(self.args.nnunet_venv / "bin" / "nnUNetv2_predict"), "-i", str(self.input), "-o", str(out)]
            cmd += ["-d", str(NNUNET_ID), "-c", NNUNET_CONFIG, "-f", "0", "-device", "cpu", "-npp", w, "-nps", w]
            return cmd + ([] if tta else ["--disable_tta"]), self.nnunet_env, out
        out = self.folder / f"out_medseg_{tool}_tta_{int(tta)}"
        cmd = [sys.executable, "-m", "medseg", "predict", "-i", str(self.input), "-o", str(out)]
        cmd += ["-m", str(self.folder / f"medseg_{tool}"), "--device", "cpu", "--num-workers", w]
        cmd += ["--time-budget-per-case", "none"]
        return cmd + ([] if tta else ["--no-tta"]), self.medseg_env, out

    def network(self, tool: str) -> str:
        """The network a tool predicts with, from its plan file (``?`` when it cannot be read)."""
        try:
            if tool == "nnU-Net":
                assert self.nnunet_model is not None
                return nnunet_network(json.loads((self.nnunet_model / "plans.json").read_text()))
            return medseg_network(json.loads((self.folder / f"medseg_{tool}" / "plans.json").read_text()))
        except (OSError, KeyError, AssertionError, json.JSONDecodeError):
            return "?"
