"""scripts/compare_nnunet.py: split, nnU-Net layout conversion, independent metrics, table, log parsing."""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.helpers import load_script

cn = load_script("compare_nnunet")


# ---------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_order_independent():
    ids = [f"case_{i:03d}" for i in range(10)]
    train, test = cn.split_cases(ids, 3)
    # pinned: results in README depend on this exact split
    assert test == ["case_003", "case_007", "case_008"]
    assert train == ["case_000", "case_001", "case_002", "case_004", "case_005", "case_006", "case_009"]
    assert cn.split_cases(list(reversed(ids)), 3) == (train, test)
    assert not set(train) & set(test) and sorted(train + test) == ids
    other_train, other_test = cn.split_cases(ids, 3, seed=1)
    assert other_test != test


def test_split_max_train_and_too_few_cases():
    ids = [f"c{i:02d}" for i in range(12)]
    train, test = cn.split_cases(ids, 2, max_train=5)
    full_train, full_test = cn.split_cases(ids, 2)
    assert test == full_test and len(train) == 5 and set(train) <= set(full_train)
    with pytest.raises(cn.CompareError, match="leave 4 for training"):
        cn.split_cases(ids[:6], 2)
    with pytest.raises(cn.CompareError):
        cn.split_cases(ids, 0)


# ---------------------------------------------------------------------------------------------- conversion


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_conversion_to_nnunet_layout(tmp_path):
    from medseg.io.synthetic import generate_synthetic_dataset

    src = generate_synthetic_dataset(tmp_path / "d", num_cases=4)
    before = _listing(src)
    ds = cn.read_source_dataset(src)
    assert ds.case_ids == ["case_000", "case_001", "case_002", "case_003"]
    assert ds.labels == {"background": 0, "large": 1, "medium": 2, "small": 3}

    train, test = ["case_000", "case_001", "case_003"], ["case_002"]
    out = cn.write_nnunet_raw(ds, train, tmp_path / "raw", dataset_id=987)
    assert out.name == "Dataset987_MedsegSynthetic"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in train]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in train]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"}
    assert meta["labels"] == {"background": 0, "large": 1, "medium": 2, "small": 3}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    # files are byte copies
    copied = (out / "imagesTr" / "case_001_0000.nii.gz").read_bytes()
    assert copied == (src / "imagesTr" / "case_001.nii.gz").read_bytes()
    assert (out / "labelsTr" / "case_003.nii.gz").read_bytes() == (src / "labelsTr" / "case_003.nii.gz").read_bytes()

    cn.write_test_split(ds, test, tmp_path / "test_images", tmp_path / "reference")
    assert [p.name for p in (tmp_path / "test_images").iterdir()] == ["case_002_0000.nii.gz"]
    assert [p.name for p in (tmp_path / "reference").iterdir()] == ["case_002.nii.gz"]
    # the converted folder reads back (nnU-Net v2 layout) with the same cases and labels
    back = cn.read_source_dataset(out)
    assert back.case_ids == train and back.labels == ds.labels
    assert _listing(src) == before  # the source was only read


def test_conversion_renumbers_gapped_labels_and_keeps_geometry(tmp_path):
    from medseg.io.synthetic import generate_synthetic_dataset

    src = generate_synthetic_dataset(tmp_path / "d", num_cases=4, label_ids=(0, 1, 2, 5))
    ds = cn.read_source_dataset(src)
    assert ds.labels["small"] == 5
    out = cn.write_nnunet_raw(ds, ds.case_ids, tmp_path / "raw")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "large": 1, "medium": 2, "small": 3}
    orig = sitk.ReadImage(str(src / "labelsTr" / "case_000.nii.gz"))
    conv = sitk.ReadImage(str(out / "labelsTr" / "case_000.nii.gz"))
    a, b = sitk.GetArrayFromImage(orig), sitk.GetArrayFromImage(conv)
    assert 5 in np.unique(a) and set(np.unique(b)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(b == 3, a == 5)
    np.testing.assert_array_equal(b == 1, a == 1)
    assert conv.GetSpacing() == orig.GetSpacing() and conv.GetOrigin() == orig.GetOrigin()
    assert conv.GetDirection() == orig.GetDirection()


def test_missing_dataset_json_is_a_clear_error(tmp_path):
    with pytest.raises(cn.CompareError, match="no dataset.json"):
        cn.read_source_dataset(tmp_path)
    assert cn.main([str(tmp_path), "--skip-nnunet", "--skip-medseg"]) == 2


# ---------------------------------------------------------------------------------------------- metrics


def test_dice_on_hand_built_masks():
    ref = np.zeros((4, 6, 6), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:3, 1:5, 1:5] = 1  # 32 voxels
    pred[1:3, 1:5, 3:5] = 1  # 16 voxels, all inside ref
    ref[0, 0, 0] = 2
    pred[3, 5, 5] = 2  # class 2 disjoint
    d = cn.dice_per_class(pred, ref, [1, 2, 3])
    assert d[1] == pytest.approx(2 * 16 / (32 + 16))
    assert d[2] == 0.0
    assert math.isnan(d[3])  # absent from both


def test_hd95_uses_anisotropic_spacing_in_array_axis_order():
    ref = np.zeros((10, 8, 8), bool)
    pred = np.zeros_like(ref)
    ref[2] = True  # one-voxel-thick plates: every voxel is surface
    pred[5] = True  # 3 voxels apart along axis 0
    assert cn.hd95(pred, ref, (3.0, 1.0, 1.0)) == pytest.approx(9.0)
    assert cn.hd95(pred, ref, (1.0, 1.0, 3.0)) == pytest.approx(3.0)
    ref2 = np.zeros((6, 6, 12), bool)
    pred2 = np.zeros_like(ref2)
    ref2[:, :, 1] = True
    pred2[:, :, 5] = True
    assert cn.hd95(pred2, ref2, (3.0, 1.0, 0.5)) == pytest.approx(2.0)
    assert cn.hd95(ref, ref, (3.0, 1.0, 1.0)) == 0.0


def test_hd95_is_symmetric_and_handles_empty_masks():
    ref = np.zeros((12, 12, 12), bool)
    ref[2:5, 2:5, 2:5] = True
    pred = ref.copy()
    pred[10, 10, 10] = True  # a far outlier in the prediction only
    spacing = (2.0, 1.0, 1.0)
    # the outlier is 1 of 27 pred-surface voxels (< 5 %), so P95 of pred->ref stays 0, but ref->pred is 0 too;
    # a 6-voxel outlier blob is > 5 % and must show up whichever mask is passed first
    pred[8:10, 8:11, 8:10] = True
    h1, h2 = cn.hd95(pred, ref, spacing), cn.hd95(ref, pred, spacing)
    assert h1 == h2 and h1 > 5.0
    empty = np.zeros_like(ref)
    assert math.isnan(cn.hd95(empty, empty, spacing))
    assert cn.hd95(empty, ref, spacing) == pytest.approx(math.sqrt(24**2 + 12**2 + 12**2))


def _write_label(path: Path, arr: np.ndarray, spacing=(1.2, 1.0, 3.0)) -> None:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)  # (x, y, z)
    img.SetOrigin((10.0, -5.0, 2.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def test_evaluate_folder_scores_missing_and_wrong_grid_predictions_as_background(tmp_path):
    ref = np.zeros((6, 10, 10), np.uint8)
    ref[2:4, 2:6, 2:6] = 1
    ref[2:4, 6:9, 6:9] = 2
    for c in ("a", "b", "c"):
        _write_label(tmp_path / "ref" / f"{c}.nii.gz", ref)
    _write_label(tmp_path / "pred" / "a.nii.gz", ref)  # perfect
    _write_label(tmp_path / "pred" / "c.nii.gz", ref, spacing=(1.0, 1.0, 1.0))  # wrong grid; b is missing
    labels = {"background": 0, "one": 1, "two": 2}
    res = cn.evaluate_folder(tmp_path / "pred", tmp_path / "ref", ["a", "b", "c"], labels)
    assert res["per_case"]["a"]["dice"] == {"one": 1.0, "two": 1.0}
    assert res["per_case"]["a"]["hd95_mm"] == {"one": 0.0, "two": 0.0}
    assert res["per_case"]["b"]["dice"] == {"one": 0.0, "two": 0.0}
    assert res["num_problems"] == 2 and any("b: no prediction" in p for p in res["problems"])
    assert any(p.startswith("c: prediction grid differs") for p in res["problems"])
    assert res["mean_dice"] == pytest.approx(1 / 3)
    diag = math.sqrt((6 * 3.0) ** 2 + 10.0**2 + (10 * 1.2) ** 2)
    assert res["mean_hd95_mm"] == pytest.approx(2 * diag / 3)


# ---------------------------------------------------------------------------------------------- table


def _stage(name, seconds, peak=None, ok=True, reason=None):
    return cn.StageResult(name, ok, seconds, peak, None, 0 if ok else 1, reason)


def test_table_rows_ratios_and_failures():
    labels = {"background": 0, "Anterior": 1, "Posterior": 2}
    nn = {
        "stages": {
            "plan": _stage("plan", 100.0, 2 * cn.GIB),
            "train": _stage("train", 600.0, 4 * cn.GIB),
            "predict": _stage("predict", 50.0, cn.GIB),
        },
        "iterations": 120,
        "train_loop_seconds": 480.0,
        "batch_patch": "9 x [40, 56, 40]",
        "metrics": {
            "dice": {"Anterior": 0.5, "Posterior": 0.8},
            "mean_dice": 0.65,
            "mean_hd95_mm": 4.0,
            "num_problems": 0,
        },
    }
    ms = {
        "stages": {
            "plan": _stage("plan", 25.0, cn.GIB),
            "train": _stage("train", 610.0, ok=False, reason="failed: exit 1: ImportError: no train"),
            "predict": cn.not_run("predict", "training failed"),
        },
        "batch_patch": "4 x [32, 48, 32]",
    }
    rows = {r.metric: r for r in cn.build_rows(nn, ms, labels, 3)}
    assert rows["plan + preprocess time (s)"].ratio == pytest.approx(0.25)
    assert rows["peak RAM plan + preprocess (GiB)"].ratio == pytest.approx(0.5)
    assert rows["training throughput (it/s)"].nnunet == pytest.approx(0.25)
    # the failure's reason appears once, on the failed stage's time row
    assert rows["training wall time (s)"].medseg == "failed: exit 1: ImportError: no train"
    assert rows["training iterations done"].medseg == "failed (train)"
    assert rows["Dice Anterior"].nnunet == 0.5 and rows["Dice Anterior"].ratio is None
    assert rows["Dice Posterior"].medseg == "failed (train)"
    assert rows["prediction time, 3 cases, TTA (s)"].nnunet == 50.0
    assert rows["prediction time, 3 cases, TTA (s)"].medseg == "failed (train)"
    assert "Dice background" not in rows

    md = cn.render_markdown(list(rows.values()))
    lines = md.strip().splitlines()
    assert lines[0] == "| metric | nnU-Net | medseg | ratio (medseg / nnU-Net) |"
    assert len(lines) == 2 + len(rows)
    assert "| plan + preprocess time (s) | 100.0 | 25.0 | 0.25 |" in lines
    assert "| Dice Anterior | 0.5000 | failed (train) | n/a |" in lines
    assert "| training wall time (s) | 600.0 | failed: exit 1: ImportError: no train | n/a |" in lines
    text = cn.render_text(list(rows.values()))
    assert "mean HD95 (mm)" in text and "4.00" in text

    skipped = {r.metric: r for r in cn.build_rows(None, ms, labels, 3)}
    assert skipped["mean Dice"].nnunet == "skipped"
    assert skipped["plan + preprocess time (s)"].medseg == 25.0 and skipped["plan + preprocess time (s)"].ratio is None


def test_format_value():
    assert cn.format_value(None) == "n/a"
    assert cn.format_value(float("nan"), "{:.4f}") == "n/a"
    assert cn.format_value(0.87654, "{:.4f}") == "0.8765"
    assert cn.format_value(180, "{:d}") == "180"


# ---------------------------------------------------------------------------------------------- tools' outputs


def test_trainer_source_is_valid_python_defining_the_trainer():
    tree = ast.parse(cn.trainer_source())
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert [c.name for c in classes] == [cn.TRAINER_NAME]
    methods = {n.name for n in classes[0].body if isinstance(n, ast.FunctionDef)}
    assert methods == {"run_training", "perform_actual_validation"}


def test_parse_nnunet_log(tmp_path):
    (tmp_path / "training_log_2025_1_1_10_00_00.txt").write_text(
        "2025-01-01 10:00:00.000: Epoch 0\n"
        "2025-01-01 10:30:00.000: medseg-budget: iterations_done=187 train_seconds=1801.25 epochs_completed=0 "
        "budget_seconds=1800 schedule=default\n"
    )
    assert cn.parse_nnunet_log(tmp_path) == {"iterations": 187, "train_loop_seconds": 1801.25, "epochs_completed": 0}
    assert cn.parse_nnunet_log(tmp_path / "nothing") == {}


@pytest.mark.parametrize(
    "progress, expected",
    [
        ({"iteration": 412, "elapsed_seconds": 1200.5}, (412, 1200.5)),
        ([{"epoch": 0, "iterations": 50}, {"epoch": 1, "iterations": 100, "elapsed": 60.0}], (100, 60.0)),
        ({"history": [{"iteration": 7}]}, (7, None)),
    ],
)
def test_parse_medseg_run_is_tolerant(tmp_path, progress, expected):
    run = tmp_path / "runs" / "3d_fullres" / "unet" / "fold_0"
    run.mkdir(parents=True)
    (run / "progress.json").write_text(json.dumps(progress))
    (tmp_path / "plans.json").write_text(
        json.dumps({"configurations": {"3d_fullres": {"batch_size": 4, "patch_size": [32, 48, 32]}}})
    )
    info = cn.parse_medseg_run(tmp_path)
    assert (info.get("iterations"), info.get("train_loop_seconds")) == expected
    assert info["configuration"] == "3d_fullres" and info["batch_patch"] == "4 x [32, 48, 32]"
    assert cn.parse_medseg_run(tmp_path / "empty") == {}


def test_run_stage_times_measures_memory_and_reports_failures(tmp_path):
    # two children holding 40 MB each at the same time: the tree's peak counts both
    child = "import time; x = b'1' * 40_000_000; time.sleep(1.2)"
    parent = (
        f"import subprocess, sys; ps = [subprocess.Popen([sys.executable, '-c', {child!r}]) for _ in range(2)]; "
        "[p.wait() for p in ps]; print('done')"
    )
    ok = cn.run_stage("ok", [sys.executable, "-c", parent], tmp_path / "ok.log")
    assert ok.ok and ok.seconds > 1.0 and ok.reason is None
    assert ok.peak_ram_bytes is not None and ok.peak_ram_bytes > 75_000_000
    assert "done" in (tmp_path / "ok.log").read_text()
    bad = cn.run_stage(
        "bad", [sys.executable, "-c", "import sys; print('ValueError: boom'); sys.exit(3)"], tmp_path / "bad.log"
    )
    assert not bad.ok and bad.returncode == 3 and bad.reason == "failed: exit 3: ValueError: boom"
    missing = cn.run_stage("missing", [str(tmp_path / "no-such-program")], tmp_path / "m.log")
    assert not missing.ok and missing.reason.startswith("failed: cannot start")
