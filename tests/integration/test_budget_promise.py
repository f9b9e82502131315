"""`medseg train --time-budget M` on a plan made without a budget: the run refits the plan and the whole
command, a fresh process, returns within M minutes + 5% (plus the start of the Python process)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from medseg.cli.main import main

pytestmark = pytest.mark.slow

#: Seconds of starting Python and importing torch before the budget starts counting (a busy 2-core machine).
STARTUP_SECONDS = 10.0


def test_train_time_budget_refits_an_unfitted_plan_and_keeps_its_promise(tmp_path, synthetic_dataset):
    work = tmp_path / "work"
    assert (
        main(
            [
                "plan",
                str(synthetic_dataset),
                "-o",
                str(work),
                "--device",
                "cpu",
                "--configs",
                "3d_fullres",
                "--num-workers",
                "1",
                "-q",
            ]
        )
        == 0
    )
    assert json.loads((work / "plans.json").read_text())["time_budget_minutes"] is None
    minutes = 0.5
    t = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medseg",
            "train",
            str(work),
            "--fold",
            "0",
            "--time-budget",
            f"{minutes}",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert wall <= minutes * 60 * 1.05 + STARTUP_SECONDS, wall

    run = work / "runs" / "3d_fullres" / "unet" / "fold_0"
    record = json.loads((run / "run_record.json").read_text())["budget_fit"]
    assert record["refit"] is True and record["reason"] == "the plan is not fitted to a time budget"
    # the probe always runs, and the first step of a process also sets its kernels up: a few seconds over
    assert record["fit_seconds"] <= record["fit_limit_seconds"] + 10.0
    notes = json.loads((run / "plans.json").read_text())["notes"]["budget"]
    assert notes["minutes"] == minutes and notes["device"] == "cpu"
    assert "refitted 3d_fullres/unet to the 0.5-minute budget" in proc.stderr
    progress = json.loads((run / "progress.json").read_text())
    assert progress["status"] == "finished" and progress["iteration"] > 0
    assert progress["elapsed_seconds"] <= minutes * 60 * 1.05
    metrics = json.loads((run / "validation" / "metrics.json").read_text())
    assert "time_budget" in metrics and metrics["validation_seconds"] >= 0
