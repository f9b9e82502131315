"""scripts/bench_predict_big.py (``bench_predict.py big``): options, nnU-Net layout, process-tree memory, table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.helpers import load_script

big = load_script("bench_predict_big")
setup = load_script("bench_predict_big_setup")


# ---------------------------------------------------------------------------------------------- options


def test_defaults_cover_every_case_plan_and_tta_setting():
    args = big.parse_args([])
    assert args.cases == ["totalseg", "voxelmorph", "synthetic"]
    assert args.plans == ["default", "cpu-budget"] and args.tta == ["off", "on"]
    assert args.threads == 2 and args.workers == 2 and args.synthetic_scale == 0.5 and not args.setup_only
    args = big.parse_args(
        ["--cases", "voxelmorph", "--tta", "on", "--plans", "cpu-budget", "--threads", "4", "--setup-only"]
    )
    assert args.cases == ["voxelmorph"] and args.tta == ["on"] and args.plans == ["cpu-budget"]
    assert args.threads == 4 and args.setup_only


@pytest.mark.parametrize(
    "bad",
    [["--synthetic-scale", "0"], ["--synthetic-scale", "1.5"], ["--synthetic-classes", "1"], ["--cases", "brats"]],
)
def test_bad_options_exit_with_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        big.parse_args(bad)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bench_predict_hands_big_to_the_companion(capsys):
    bench = load_script("bench_predict")
    with pytest.raises(SystemExit) as exc:
        bench.main(["big", "--help"])
    assert exc.value.code == 0
    assert "--synthetic-scale" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- nnU-Net layout


def _write(path: Path, arr: np.ndarray, spacing=(0.7, 0.9, 2.5), origin=(3.0, -4.0, 10.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))


def test_nnunet_raw_renumbers_gapped_ids_of_a_one_case_dataset_and_keeps_geometry(tmp_path):
    data = tmp_path / "data"
    label = np.zeros((4, 5, 6), np.uint8)
    label[0, :2] = 2
    label[1:3, 3:] = 7
    _write(data / "imagesTr" / "brain.nii.gz", np.arange(120, dtype=np.float32).reshape(4, 5, 6))
    _write(data / "labelsTr" / "brain.nii.gz", label)
    meta = {"name": "Gap Set", "modality": {"0": "MRI"}, "labels": {"0": "background", "2": "left", "7": "right"}}
    (data / "dataset.json").write_text(json.dumps(meta))

    raw = setup.nnunet_raw(data, tmp_path / "raw", dataset_id=986)

    assert raw == tmp_path / "raw" / "Dataset986_GapSet"
    ds = json.loads((raw / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "left": 1, "right": 2}
    assert ds["channel_names"] == {"0": "MRI"} and ds["numTraining"] == 1 and ds["file_ending"] == ".nii.gz"
    image = raw / "imagesTr" / "brain_0000.nii.gz"
    assert image.is_symlink() and image.resolve() == (data / "imagesTr" / "brain.nii.gz").resolve()
    out = sitk.ReadImage(str(raw / "labelsTr" / "brain.nii.gz"))
    src = sitk.ReadImage(str(data / "labelsTr" / "brain.nii.gz"))
    lut = np.zeros(8, np.uint8)
    lut[[2, 7]] = [1, 2]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), lut[label])
    assert out.GetSpacing() == src.GetSpacing() and out.GetOrigin() == src.GetOrigin()
    assert out.GetDirection() == src.GetDirection()


def test_nnunet_raw_refuses_several_channels_and_missing_images(tmp_path):
    data = tmp_path / "data"
    _write(data / "labelsTr" / "a.nii.gz", np.zeros((2, 2, 2), np.uint8))
    (data / "imagesTr").mkdir()
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "x": 1}}
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="2 channels"):
        setup.nnunet_raw(data, tmp_path / "raw")
    meta["channel_names"] = {"0": "T1"}
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no image for labelled case a"):
        setup.nnunet_raw(data, tmp_path / "raw")


def test_synthetic_dataset_declares_consecutive_ids_that_all_occur(tmp_path):
    data = setup.write_synthetic_dataset(tmp_path / "syn", scale=0.04, classes=6)
    meta = json.loads((data / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, **{f"class_{i}": i for i in range(1, 6)}}
    img = sitk.ReadImage(str(data / "imagesTr" / "synthetic_ct.nii.gz"))
    lab = sitk.ReadImage(str(data / "labelsTr" / "synthetic_ct.nii.gz"))
    assert img.GetSize() == lab.GetSize() == (20, 20, 16)  # (x, y, z) of round((512, 512, 400) * 0.04)
    assert img.GetSpacing() == lab.GetSpacing() == pytest.approx((0.8, 0.8, 1.5), rel=1e-6)  # NIfTI: float32
    arr, labels = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)
    assert set(np.unique(labels)) == set(range(6))
    np.testing.assert_array_equal(labels > 0, arr > -500)  # the body is labelled, the air is not


def test_prediction_commands_switch_tta_and_share_one_input(tmp_path):
    args = big.parse_args(["--workers", "3", "--nnunet-venv", str(tmp_path / "venv")])
    case = setup.CaseSetup("voxelmorph", tmp_path / "case", args)
    case.input = tmp_path / "case" / "in"
    cmd, env, out = case.predict_command("nnU-Net", tta=False)
    assert cmd[0].endswith("nnUNetv2_predict") and "--disable_tta" in cmd
    assert cmd[cmd.index("-i") + 1] == str(case.input) and cmd[cmd.index("-npp") + 1] == "3"
    assert cmd[cmd.index("-device") + 1] == "cpu" and env is case.nnunet_env
    assert "--disable_tta" not in case.predict_command("nnU-Net", tta=True)[0]
    full, env, out_m = case.predict_command("cpu-budget", tta=False)
    assert full[1:4] == ["-m", "medseg", "predict"]
    cmd = full[4:]
    assert cmd[cmd.index("-m") + 1] == str(tmp_path / "case" / "medseg_cpu-budget") and "--no-tta" in cmd
    assert cmd[cmd.index("-i") + 1] == str(case.input) and out_m != out and env["PYTHONPATH"]
    assert cmd[cmd.index("--time-budget-per-case") + 1] == "none"
    assert "--no-tta" not in case.predict_command("default", tta=True)[0]
    assert setup.tool_env({"A": "1"}, 2) == {"A": "1", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def test_network_descriptions_read_each_tools_plan():
    medseg_plan = {
        "default_configuration": "3d_fullres",
        "configurations": {
            "3d_fullres": {
                "name": "3d_fullres",
                "default_arch": "unet",
                "networks": {
                    "unet": {
                        "patch_size": [64, 48, 96],
                        "precision": "bf16",
                        "spec": {"base_features": 16, "max_features": 256, "strides": [[1, 1, 1], [2, 2, 2]]},
                    }
                },
            }
        },
    }
    assert setup.medseg_network(medseg_plan) == "3d_fullres patch [64, 48, 96], features 16..256, 2 stages, bf16"
    nn_plan = {
        "configurations": {
            "3d_fullres": {
                "patch_size": [128, 128, 128],
                "batch_size": 2,
                "architecture": {"arch_kwargs": {"features_per_stage": [32, 64]}},
            }
        }
    }
    assert setup.nnunet_network(nn_plan) == "patch [128, 128, 128], batch 2, features [32, 64]"


# ---------------------------------------------------------------------------------------------- process tree


def test_tree_totals_sum_the_tree_only_once_each():
    children = {10: [11, 12], 11: [13], 12: [], 13: [11], 99: [100]}  # 13 -> 11 repeats a member
    memory = {10: (100, 60), 11: (50, 20), 12: (30, 30), 13: (7, 5), 99: (1000, 1000), 100: (5, 5)}
    assert big.tree_totals(10, children, memory) == (187, 115, 4)
    assert big.tree_totals(11, children, memory) == (57, 25, 2)
    # a member that exited between reads counts as a member with no memory
    assert big.tree_totals(10, {10: [14]}, {10: (100, 60)}) == (100, 60, 2)
    peak = big.TreePeak()
    peak.update(187, 115, 4)
    peak.update(200, 90, 2)
    assert (peak.rss, peak.pss, peak.processes) == (200, 115, 4)


def test_run_measured_counts_a_worker_and_its_memory(tmp_path):
    child = "import time; b = bytearray(120_000_000); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    m = big.run_measured([sys.executable, "-c", parent], {}, tmp_path / "log.txt", timeout=60, max_tree_bytes=1e12)
    assert m.returncode == 0 and m.stopped is None
    assert m.peak.processes == 2
    assert m.peak.rss > 120e6 and 0 < m.peak.pss <= m.peak.rss
    assert m.seconds >= 1.5 and m.cpu_seconds > 0
    assert (tmp_path / "log.txt").read_text().startswith("$ ")


def test_run_measured_stops_a_tree_over_its_memory_cap(tmp_path):
    code = "import time; b = bytearray(200_000_000); b[::4096] = b'x' * len(b[::4096]); time.sleep(60)"
    m = big.run_measured([sys.executable, "-c", code], {}, tmp_path / "log.txt", timeout=60, max_tree_bytes=100e6)
    assert m.stopped == "stopped: tree RSS over 0.1 GB" and m.returncode != 0
    assert m.seconds < 30


# ---------------------------------------------------------------------------------------------- table


def _row(case, tta, tool, seconds, cpu, rss, status="ok"):
    return {
        "case": case,
        "tta": tta,
        "tool": tool,
        "network": "n",
        "status": status,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "rss_gb": rss,
        "pss_gb": rss / 2,
        "processes": 1,
    }


def test_ratios_pair_medseg_with_nnunet_of_the_same_case_and_tta():
    rows = [
        _row("voxelmorph", "off", "default", 30.0, 20.0, 2.0),
        _row("voxelmorph", "off", "nnU-Net", 60.0, 80.0, 8.0),
        _row("voxelmorph", "on", "default", 90.0, 100.0, 3.0),
        _row("voxelmorph", "on", "nnU-Net", 900.0, 700.0, 9.0, status="stopped: over 900 s"),
        _row("totalseg", "off", "cpu-budget", 10.0, 5.0, 1.0),
    ]
    out = big.ratio_rows(rows)
    assert out[0]["ratio_seconds"] == 0.5 and out[0]["ratio_cpu_seconds"] == 0.25 and out[0]["ratio_rss_gb"] == 0.25
    assert out[1]["ratio_seconds"] is None  # nnU-Net's own row
    assert out[2]["ratio_seconds"] is None  # its nnU-Net run was stopped
    assert out[4]["ratio_seconds"] is None  # no nnU-Net row for totalseg
    table = big.render_markdown(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(rows)
    assert "| voxelmorph | off | medseg (default) |" in lines[2] and lines[2].endswith("| 0.50 | 0.25 | 0.25 |")
    assert "stopped: over 900 s" in lines[5]


def test_rows_of_a_rerun_replace_the_earlier_ones(tmp_path):
    a, b = _row("totalseg", "off", "default", 1.0, 1.0, 1.0), _row("totalseg", "off", "nnU-Net", 2.0, 2.0, 2.0)
    rows = big.merge_row(big.merge_row([], a), b)
    again = _row("totalseg", "off", "default", 5.0, 5.0, 5.0)
    assert big.merge_row(rows, again) == [again, b]
    path = tmp_path / "bench_predict_big.json"
    assert big.previous_rows(path) == []
    path.write_text(json.dumps({"rows": rows}))
    assert big.previous_rows(path) == rows
    path.write_text("{not json")
    assert big.previous_rows(path) == []


def test_row_status_needs_exit_zero_and_an_output():
    m = big.Measured(12.34, 5.67, big.TreePeak(2_500_000_000, 1_000_000_000, 3), 0)
    row = big.row_of("synthetic", "on", "nnU-Net", "net", m, outputs=1)
    assert row["status"] == "ok" and row["seconds"] == 12.3 and row["rss_gb"] == 2.5 and row["processes"] == 3
    assert big.row_of("synthetic", "on", "nnU-Net", "net", m, outputs=0)["status"] == "failed (0)"
    m.returncode, m.stopped = -15, "stopped: over 900 s"
    assert big.row_of("synthetic", "on", "nnU-Net", "net", m, outputs=0)["status"] == "stopped: over 900 s"
