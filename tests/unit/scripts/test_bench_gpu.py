"""scripts/bench_gpu.py: the GPU check's dry run on the CPU (every part, every row) and its verdict rules."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medseg.inference.sliding_window import PredictionStopped
from tests.conftest import shared_dataset
from tests.helpers import load_script


@pytest.mark.slow
def test_dry_run_has_every_row_with_sane_numbers(tmp_path):
    bench = load_script("bench_gpu")
    out = tmp_path / "out"
    rc = bench.main(["--dry-run", "--out", str(out), "--data", str(shared_dataset("hippocampus"))])
    assert rc == 0
    report = json.loads((out / "gpu_check.json").read_text())
    table = (out / "gpu_check.md").read_text()
    rows = {(r["part"], r["row"]): r for r in report["rows"]}
    assert not [r for r in report["rows"] if r["row"] == "(part)"], "a part died"
    assert report["info"]["card"] == "CPU (dry run)" and report["gpu_memory_gb"] == 2.0

    train = load_script("bench_gpu_train")
    for name, config in train.MEMORY_ROWS:
        row = rows[("memory", f"{name} {config}")]
        v = row["values"]
        assert v["steps_done"] == 2 and v["step_s"] > 0
        assert 0.5 < v["ratio"] < 2.0 and v["estimate_gb"] > 0, row  # the CPU model agrees within a few %
        assert not row["status"].startswith("crashed"), row
        assert f"{name} {config}" in table

    for precision, cl in train.SETTINGS:
        row = rows[("throughput", f"tumour128 3d_fullres {precision}{' channels-last' if cl else ''}")]
        if precision == "fp16":
            assert row["status"] == "skipped: fp16 autocast needs CUDA"
            continue
        v = row["values"]
        assert row["status"] == "ok" and v["it_per_s"] > 0 and v["flops_per_step"] > 0
        assert v["tflops"] == pytest.approx(v["flops_per_step"] * v["it_per_s"] / 1e12)
        assert v["peak_tflops"] is None  # no GPU: no peak to compare with
    choice = [r for r in report["rows"] if r["row"].startswith("run's choice")]
    assert len(choice) == 1 and choice[0]["values"]["chosen"][0] in ("fp32", "bf16")

    pred = [r for r in report["rows"] if r["part"] == "prediction"]
    assert len(pred) == 3
    for row in pred[:2]:
        assert row["status"] == "ok", row
        assert row["values"]["seconds"] > 0 and row["values"]["passes"] == 8
        assert row["values"]["forwards"] == row["values"]["forwards_total"] > 0
    assert pred[2]["status"].startswith("n/a on the CPU") and pred[2]["values"]["passes"] == 1

    run = rows[("real run", "hippocampus plan + train + predict")]
    assert run["status"] == "ok" and run["values"]["iterations"] == 2
    assert all(run["values"][f"{step}_s"] > 0 for step in ("plan", "train", "predict", "evaluate"))
    for label in ("1", "2"):
        dice = rows[("real run", f"Dice class {label}")]["values"]["dice"]
        assert 0.0 <= dice <= 1.0


def test_fallback_status_tells_fallback_from_crash():
    predict = load_script("bench_gpu_predict")
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
    assert predict.fallback_status(oom, [], on_gpu=True) == "crashed: OOM"
    assert predict.fallback_status(RuntimeError("CUDA error: out of memory"), [], True) == "crashed: OOM"
    assert predict.fallback_status(ValueError("bad shape"), [], True) == "crashed: ValueError: bad shape"
    warned = ["the accumulator does not fit the GPU: accumulating on the CPU"]
    assert predict.fallback_status(None, warned, True) == f"fell back: {warned[0]}"
    assert predict.fallback_status(None, [], True).startswith("OFF: finished without a warning")
    stopped = PredictionStopped("deadline")
    assert predict.fallback_status(stopped, warned, True).startswith("fell back, stopped at its time box")
    assert predict.fallback_status(stopped, [], True).startswith("OFF: stopped")
    assert predict.fallback_status(None, [], on_gpu=False).startswith("n/a on the CPU")


def test_memory_verdict_and_peaks():
    train = load_script("bench_gpu_train")
    assert train.memory_verdict(0.95, 1.0, 10.0, 79.0) == "ok"
    assert train.memory_verdict(1.2, 1.0, 10.0, 79.0) == "OFF: ratio 1.20 outside 0.85-1.1"
    assert (
        train.memory_verdict(0.5, 1.0, 80.5, 79.0) == "OFF: ratio 0.50 outside 0.85-1.1; reserved 80.50 > target 79 GiB"
    )
    assert train.memory_verdict(math.nan, 1.0, None, 79.0) == "ok"  # nothing measured: the status says why
    assert train.peak_tflops(torch.device("cpu"), "bf16") is None
    assert train.error_status(torch.OutOfMemoryError("out of memory")) == "crashed: OOM"


def test_part_boxes_keep_room_for_the_later_parts():
    bench = load_script("bench_gpu")
    later = ["throughput", "prediction", "real_run"]
    assert bench.part_box("memory", later, 480, False) == bench.BOX_S["memory"]
    squeezed = bench.part_box("memory", later, 380, False)
    assert squeezed == 380 - sum(bench.MIN_S[p] for p in later) < bench.BOX_S["memory"]
    assert bench.part_box("real_run", [], 200, False) == 200
    assert bench.part_box("memory", later, 10, False) == 1.0
    assert bench.part_box("memory", later, 480, True) == bench.DRY_BOX_S
    table = bench.render_table({"card": "X"}, [{"part": "p", "row": "a|b", "status": "ok"}], "cmd", 1.0)
    assert "| p | a/b |" in table and table.count("\n") == 6
