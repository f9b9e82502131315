"""scripts/bench_quality.py on the work folders it is meant for: fold 0 of a 3d_fullres plan, one with a U-Net
trained with ``--snapshots`` (predicted with every snapshot), one whose only run is a SegResNet; find-best ran
on each. Per model: its members, checkpoint and within-model Spearman; pooled over both."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, shrink_networks

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_quality.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_quality_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_snapshot_unet_and_segresnet_fold_0_work_folders(tmp_path, hippocampus_subset, capsys):
    data = hippocampus_subset(6)
    held = hippocampus_subset(3, start=150)
    works = {"unet": tmp_path / "work_unet", "segresnet": tmp_path / "work_segresnet"}
    plan = [
        "plan",
        str(data),
        "--num-workers",
        "1",
        "--device",
        "cpu",
        "--configs",
        "3d_fullres",
        "--archs",
        "unet",
        "segresnet",
    ]
    assert main([*plan, "-o", str(works["unet"])]) == 0
    shrink_networks(works["unet"])
    shutil.copytree(works["unet"], works["segresnet"])
    assert main(["train", str(works["unet"]), "--fold", "0", *TINY_TRAIN, "--snapshots", "2"]) == 0
    assert main(["train", str(works["segresnet"]), "--fold", "0", "--arch", "segresnet", *TINY_TRAIN]) == 0
    for work in works.values():
        assert main(["find-best", str(work)]) == 0
    images, labels = tmp_path / "held" / "images", held / "labelsTr"
    images.mkdir(parents=True)
    for src in sorted((held / "imagesTr").glob("*.nii.gz")):
        shutil.copy(src, images / src.name.replace(".nii.gz", "_0000.nii.gz"))
    out = tmp_path / "bench"
    capsys.readouterr()
    _load().main(
        [
            "-o",
            str(out),
            "--model",
            f"snap={works['unet']}",
            "--model",
            f"seg={works['segresnet']}",
            "--checkpoint",
            "snap=snapshots",
            "--time-budget-per-case",
            "none",
            "--held",
            str(images),
            str(labels),
        ]
    )
    doc = json.loads((out / "bench_quality.json").read_text())
    models = {m["model"]: m for m in doc["models"]}
    assert [Path(s).name for s in models["snap"]["members"]] == ["checkpoint_snapshot_1.pt", "checkpoint_snapshot_2.pt"]
    assert models["snap"]["checkpoint"] == "snapshots" and models["seg"]["checkpoint"] == "final"
    assert models["seg"]["time_budget_per_case"] == "none"
    assert [Path(s).parts[-4:] for s in models["seg"]["members"]] == [
        ("3d_fullres", "segresnet", "fold_0", "checkpoint_final.pt")
    ]
    assert set(doc["per_model"]) == {"snap", "seg"} and doc["pooled"]["cases"] == 6
    for name in ("snap", "seg"):
        assert doc["per_model"][name]["cases"] == 3 and "spearman" in doc["per_model"][name]
        assert sorted(r["case"] for r in doc["cases"] if r["model"] == name) == sorted(
            p.name[: -len("_0000.nii.gz")] for p in images.iterdir()
        )
        quality = json.loads((out / name / "quality.json").read_text())
        assert len(quality["cases"]) == 3
    table = capsys.readouterr().out
    assert "| snap | 3 |" in table and "| seg | 3 |" in table and "| **pooled** | 6 |" in table
