"""An ignore label (partial annotation) through the real CLI: plan, train, predict, evaluate.

A synthetic dataset has the first third of the axial slices of every label map set to the ignore id
(the highest id, declared as ``"9": "ignore"``). The plan records the ignore id and has no output for
it; predictions hold only declared class ids and keep the input geometry; evaluation skips the
ignored reference voxels.
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
IGNORE = 9  # gapped: the stored class index of ignored voxels is K = 4, not the id


def _partially_annotated(root: Path) -> Path:
    from medseg.io.synthetic import generate_synthetic_dataset

    data = generate_synthetic_dataset(root / "data", num_cases=5, seed=3, shape=(15, 32, 28))
    meta = json.loads((data / "dataset.json").read_text())
    meta["labels"][str(IGNORE)] = "ignore"
    (data / "dataset.json").write_text(json.dumps(meta, indent=1))
    for path in sorted((data / "labelsTr").glob("*.nii.gz")):
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
        arr[: arr.shape[0] // 3] = IGNORE
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(path))
    return data


def test_ignore_label_end_to_end(tmp_path, capsys):
    data = _partially_annotated(tmp_path)
    work = tmp_path / "work"
    assert main(["plan", str(data), "-o", str(work), "--device", "cpu", "--num-workers", "1", "-q"]) == 0
    assert "preprocessing" not in capsys.readouterr().err  # -q: no progress bars
    plan = json.loads((work / "plans.json").read_text())
    assert plan["ignore_label"] == IGNORE and plan["label_ids"] == [0, 1, 2, 3]
    fingerprint = json.loads((work / "fingerprint.json").read_text())
    assert all(set(c["class_voxel_counts"]) <= {"1", "2", "3"} for c in fingerprint["cases"])
    from medseg.planning.plan import Plan
    from medseg.preprocessing import load_case

    loaded = Plan.load(work / "plans.json")
    assert loaded.num_classes == 4 and loaded.ignore_class == 4
    _, seg, props = load_case(work, loaded, "3d_fullres", "case_000")
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3, 4} and 4 in seg  # ignored voxels kept as class K
    assert set(props.class_locations) == {1, 2, 3}
    shrink_networks(work, 4)
    assert main(["train", str(work), "--fold", "0", *TINY_TRAIN, "-q"]) == 0
    err = capsys.readouterr().err
    assert "epoch 0:" not in err and "final validation:" not in err
    run = work / "runs" / "3d_fullres" / "unet" / "fold_0"
    progress = json.loads((run / "progress.json").read_text())
    assert progress["history"] and all(np.isfinite(e["train_loss"]) for e in progress["history"])
    metrics = json.loads((run / "validation" / "metrics.json").read_text())
    assert metrics["label_ids"] == [0, 1, 2, 3] and metrics["num_cases"] >= 1
    for cid in metrics["per_case"]:
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(run / "validation" / f"{cid}.nii.gz")))))
        assert values <= {0, 1, 2, 3}

    inp, out = tmp_path / "in", tmp_path / "pred"
    inp.mkdir()
    images = sorted((data / "imagesTr").glob("*.nii.gz"))[:2]
    for p in images:
        shutil.copy(p, inp / p.name)
    capsys.readouterr()
    assert main(["predict", "-i", str(inp), "-o", str(out), "-m", str(work), "--device", "cpu", "--no-tta", "-q"]) == 0
    assert "predict:" not in capsys.readouterr().err  # -q: no progress bar
    for src in images:  # never the ignore id, never an undeclared id
        assert_prediction_like_input(out / src.name, src, {0, 1, 2, 3})

    report = tmp_path / "eval.json"
    assert main(["evaluate", str(out), str(data), "-o", str(report), "--num-workers", "1", "-q"]) == 0
    result = json.loads(report.read_text())
    assert result["ignore_label"] == IGNORE and str(IGNORE) not in result["mean"]
    assert all(c["ignored_voxels"] > 0 for c in result["cases"])
    assert "evaluate:" not in capsys.readouterr().err

    assert main(["find-best", str(work), "-q"]) == 0
    err = capsys.readouterr().err
    assert "find-best:" not in err and "postprocessing search" not in err
