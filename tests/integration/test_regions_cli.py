"""Region-based training (nnU-Net v2) through the real CLI: plan, train 3D and 2D, find-best, predict
(from the work folder and from an exported bundle), evaluate.

The synthetic dataset's labels 1, 2, 3 become regions ``all = {1, 2, 3}``, ``inner = {2, 3}``, ``small = {3}``
with ``regions_class_order [1, 2, 3]``. The plan records the regions and its networks have one sigmoid output
per region; predictions hold only ids of ``regions_class_order`` (or 0) and keep the input geometry; the
final validation and ``medseg evaluate`` report Dice per region.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from tests.helpers import TINY_TRAIN, assert_prediction_like_input, shrink_networks

pytestmark = pytest.mark.slow
REGIONS = [[1, 2, 3], [2, 3], [3]]
KEYS = ["(1, 2, 3)", "(2, 3)", "3"]


def _region_dataset(root: Path) -> Path:
    from medseg.io.synthetic import generate_synthetic_dataset

    data = generate_synthetic_dataset(root / "data", num_cases=5, seed=4, shape=(15, 32, 28))
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "all": [1, 2, 3], "inner": [2, 3], "small": 3}
    meta["regions_class_order"] = [1, 2, 3]
    (data / "dataset.json").write_text(json.dumps(meta, indent=1))
    return data


def test_region_based_end_to_end(tmp_path):
    data = _region_dataset(tmp_path)
    work = tmp_path / "work"
    assert (
        main(
            [
                "plan",
                str(data),
                "-o",
                str(work),
                "--device",
                "cpu",
                "--num-workers",
                "1",
                "-q",
                "--configs",
                "3d_fullres",
                "2d",
            ]
        )
        == 0
    )
    plan = json.loads((work / "plans.json").read_text())
    assert plan["regions"] == REGIONS and plan["regions_class_order"] == [1, 2, 3]
    assert plan["label_ids"] == [0, 1, 2, 3]
    shrink_networks(work, 4)
    from medseg.planning.plan import Plan

    assert Plan.load(work / "plans.json").num_classes == 3

    for config in ("3d_fullres", "2d"):
        assert main(["train", str(work), "--config", config, "--fold", "0", *TINY_TRAIN, "-q"]) == 0
        run = work / "runs" / config / "unet" / "fold_0"
        progress = json.loads((run / "progress.json").read_text())
        assert progress["history"] and all(np.isfinite(e["train_loss"]) for e in progress["history"])
        assert [len(e["dice_per_class"]) for e in progress["history"]] == [3]  # pseudo Dice per region
        metrics = json.loads((run / "validation" / "metrics.json").read_text())
        assert list(metrics["mean_dice"]) == KEYS and metrics["regions"] == REGIONS and metrics["num_cases"] >= 1
        for cid in metrics["per_case"]:
            seg = sitk.GetArrayFromImage(sitk.ReadImage(str(run / "validation" / f"{cid}.nii.gz")))
            assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
            with np.load(run / "validation" / f"{cid}.npz") as f:
                probs = f["probabilities"]
            assert probs.shape == (3, *seg.shape) and probs.min() >= 0 and probs.max() <= 1

    assert main(["find-best", str(work), "-q"]) == 0
    best = json.loads((work / "best.json").read_text())
    assert set(best["dice_per_label"]) == set(KEYS)

    inp, out = tmp_path / "in", tmp_path / "pred"
    inp.mkdir()
    images = sorted((data / "imagesTr").glob("*.nii.gz"))[:2]
    for p in images:
        shutil.copy(p, inp / p.name)
    assert main(["predict", "-i", str(inp), "-o", str(out), "-m", str(work), "--device", "cpu", "--no-tta", "-q"]) == 0
    for src in images:
        assert_prediction_like_input(out / src.name, src, {0, 1, 2, 3})

    bundle, out_b = tmp_path / "model.zip", tmp_path / "pred_bundle"
    assert main(["export", str(work), "-o", str(bundle), "-q"]) == 0
    assert (
        main(["predict", "-i", str(inp), "-o", str(out_b), "-m", str(bundle), "--device", "cpu", "--no-tta", "-q"]) == 0
    )
    for src in images:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(out / src.name)))
        np.testing.assert_array_equal(a, sitk.GetArrayFromImage(sitk.ReadImage(str(out_b / src.name))))

    report = tmp_path / "eval.json"
    assert main(["evaluate", str(out), str(data), "-o", str(report), "--num-workers", "1", "-q"]) == 0
    result = json.loads(report.read_text())
    assert result["regions"] == REGIONS and list(result["mean"]) == KEYS


def test_regions_with_an_ignore_label(tmp_path):
    """Unannotated voxels (``ignore``, id 9) in a region dataset: masked out of training and evaluation."""
    data = _region_dataset(tmp_path)
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"]["ignore"] = 9
    (data / "dataset.json").write_text(json.dumps(meta, indent=1))
    for path in sorted((data / "labelsTr").glob("*.nii.gz")):
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
        arr[: arr.shape[0] // 3] = 9
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(path))
    work = tmp_path / "work"
    assert (
        main(
            [
                "plan",
                str(data),
                "-o",
                str(work),
                "--device",
                "cpu",
                "--num-workers",
                "1",
                "-q",
                "--configs",
                "3d_fullres",
            ]
        )
        == 0
    )
    plan = json.loads((work / "plans.json").read_text())
    assert plan["ignore_label"] == 9 and plan["regions"] == REGIONS
    shrink_networks(work, 4)
    assert main(["train", str(work), "--fold", "0", *TINY_TRAIN, "-q"]) == 0
    run = work / "runs" / "3d_fullres" / "unet" / "fold_0"
    progress = json.loads((run / "progress.json").read_text())
    assert all(np.isfinite(e["train_loss"]) for e in progress["history"])
    out = run / "validation"
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(out), str(data), "-o", str(report), "--num-workers", "1", "-q"]) == 0
    result = json.loads(report.read_text())
    assert result["ignore_label"] == 9 and list(result["mean"]) == KEYS
    assert all(c["ignored_voxels"] > 0 for c in result["cases"])
