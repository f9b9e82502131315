"""``medseg predict --instances`` through the real CLI on a tiny trained model: an instance map per case with
the input's exact geometry beside the semantic map, and ``instances.json`` consistent with both."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.cli.main import main
from tests.helpers import assert_prediction_like_input, shrink_networks

pytestmark = pytest.mark.slow


def test_predict_instances_writes_maps_and_the_table(tmp_path, synthetic_dataset, capsys):
    work = tmp_path / "work"
    plan = ["plan", str(synthetic_dataset), "-o", str(work), "--num-workers", "1", "--device", "cpu"]
    assert main([*plan, "--configs", "3d_fullres"]) == 0
    shrink_networks(work)
    train = ["train", str(work), "--fold", "0", "--epochs", "1", "--iters-per-epoch", "2", "--device", "cpu"]
    assert main([*train, "--num-workers", "0", "--no-validation"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    sources = sorted((synthetic_dataset / "imagesTr").glob("*.nii.gz"))[:2]
    for src in sources:
        shutil.copy(src, images / src.name)
    declared = {int(k) for k in json.loads((synthetic_dataset / "dataset.json").read_text())["labels"]}
    capsys.readouterr()

    out = tmp_path / "out"
    predict = ["predict", "-i", str(images), "-o", str(out), "-m", str(work), "--device", "cpu"]
    flags = ["--instances", "--instance-connectivity", "2", "--split-touching", "--min-separation-mm", "6"]
    assert main([*predict, *flags]) == 0
    assert f"instances of 2 case(s) written to {out / 'instances.json'}" in capsys.readouterr().out
    doc = json.loads((out / "instances.json").read_text())
    assert doc["format"] == "medseg-instances-v1" and sorted(doc["cases"]) == sorted(
        s.name[: -len(".nii.gz")] for s in sources
    )
    for src in sources:
        case = src.name[: -len(".nii.gz")]
        entry = doc["cases"][case]
        assert entry["options"] == {
            "connectivity": 2,
            "split_touching": True,
            "min_separation_mm": 6.0,
            "min_depth_mm": None,
        }
        inst_path = out / entry["instance_map"]
        assert inst_path.name == f"{case}_instances.nii.gz"
        rows = entry["instances"]
        assert_prediction_like_input(out / src.name, src, declared)
        assert_prediction_like_input(inst_path, src, set(range(len(rows) + 1)))
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / src.name)))
        inst = sitk.GetArrayFromImage(sitk.ReadImage(str(inst_path)))
        np.testing.assert_array_equal(inst > 0, seg > 0)
        assert [r["id"] for r in rows] == list(range(1, len(rows) + 1))
        spacing = sitk.ReadImage(str(src)).GetSpacing()
        for r in rows:
            voxels = inst == r["id"]
            assert r["voxels"] == int(voxels.sum()) > 0
            assert set(np.unique(seg[voxels]).tolist()) == {r["label"]}
            assert r["volume_ml"] == pytest.approx(r["voxels"] * float(np.prod(spacing)) / 1000)
            assert 0.0 < r["score"] <= 1.0
            lo, c, hi = (np.array(r[k]) for k in ("bbox_min_mm", "centroid_mm", "bbox_max_mm"))
            assert np.all(lo - 1e-9 <= c) and np.all(c <= hi + 1e-9)  # world box around the voxel centres
    assert sorted(p.name for p in images.iterdir()) == sorted(s.name for s in sources)  # nothing beside the input

    # the output folder evaluates as it is: the instance maps beside the segmentations are not cases
    metrics = tmp_path / "metrics" / "metrics.json"
    labels = ["evaluate", str(out), str(synthetic_dataset / "labelsTr"), "-o", str(metrics), "--lesion-wise"]
    assert main(labels) == 0
    report = json.loads(metrics.read_text())
    assert report["num_cases"] == 2 and sorted(c["case"] for c in report["cases"]) == sorted(doc["cases"])
    assert set(report["foreground_mean"]["lesion_wise"]) == {
        "tp",
        "fp",
        "fn",
        "precision",
        "recall",
        "f1",
        "lesion_dice",
        "lesion_hd95",
        "pq",
    }
