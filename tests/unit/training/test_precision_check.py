"""A CPU run at a reduced precision first checks, in a child process, that its step does not crash (issue 42)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medseg import faults
from medseg.distributed import DistContext
from medseg.planning.step_timing import StepTiming
from medseg.training import TrainConfig, device, load_checkpoint, train
from medseg.training.device import checked_precision
from tests.helpers import network_plan

NET = network_plan(
    arch="unet",
    patch_size=(8, 16, 16),
    batch_size=2,
    kernel_sizes=((3, 3, 3),) * 3,
    strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
    base_features=4,
    max_features=16,
)


@pytest.fixture
def probes(monkeypatch):
    """Replace the child process by an answer: ``probes.answer`` (a StepTiming); ``probes.calls`` the settings."""

    class Probes:
        answer = StepTiming(0.01, rounds=(0.01,))
        calls: list = []

    def fake(setting, seed=0, fault_spec=None):
        Probes.calls.append(setting)
        return Probes.answer

    monkeypatch.setattr(device, "probe_step_in_child", fake)
    return Probes


def test_a_crashing_bf16_step_falls_back_to_fp32(probes, caplog):
    probes.answer = StepTiming(math.inf, "crashed (SIGSEGV)")
    precision, record = checked_precision("bf16", True, NET, 1, 3, torch.device("cpu"), DistContext(), seed=3)
    assert precision == "fp32"
    assert record["status"] == "crashed (SIGSEGV)" and record["fallback"] == "fp32" and record["precision"] == "bf16"
    s = probes.calls[0]
    assert (s.net, s.precision, s.channels_last, s.in_channels, s.num_classes) == (NET, "bf16", True, 1, 3)
    assert "trains in fp32" in caplog.text


def test_a_working_bf16_step_is_kept_and_fp32_or_cuda_are_not_checked(probes):
    precision, record = checked_precision("bf16", False, NET, 1, 3, torch.device("cpu"), DistContext())
    assert precision == "bf16" and record["status"] == "measured" and "fallback" not in record
    assert checked_precision("fp32", True, NET, 1, 3, torch.device("cpu"), DistContext()) == ("fp32", None)
    assert checked_precision("fp16", False, NET, 1, 3, torch.device("cuda"), DistContext()) == ("fp16", None)
    assert len(probes.calls) == 1


def test_a_run_whose_bf16_step_kills_its_process_trains_in_fp32(tiny_work):
    """Regression: the test-only fault kills every process that steps at bf16; the run checks its step in a
    child first, trains in fp32, and records why."""
    faults.arm("step_probe:bf16=segv")
    try:
        run = train(
            tiny_work,
            TrainConfig(
                epochs=1,
                iters_per_epoch=2,
                val_iters=1,
                num_workers=0,
                num_threads=1,
                precision="bf16",
                seed=3,
                final_validation=False,
            ),
        )
    finally:
        faults.arm(None)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["precision"] == "fp32"
    check = json.loads((run / "run_record.json").read_text())["precision_check"]
    assert check["precision"] == "bf16" and check["status"] == "crashed (SIGSEGV)" and check["fallback"] == "fp32"
    assert check["threads"] == 1
    ckpt = load_checkpoint(run / "checkpoint_final.pt")
    assert ckpt["precision"] == "fp32" and ckpt["train_config"]["precision"] == "fp32"
    assert "trains in fp32" in (run / "training_log.txt").read_text()
