"""Step timing in a child process (a native crash kills only the child) and the fastest-round statistic."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from medseg import faults
from medseg.errors import ConfigError
from medseg.planning import step_timing
from medseg.planning.step_child import measure_in_child, probe_step_in_child
from medseg.planning.step_timing import (
    MAX_ROUNDS,
    StepSetting,
    StepTiming,
    measure_step_times,
)
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
def armed():
    yield faults.arm
    faults.arm(None)


def test_the_statistic_is_the_fastest_round_and_the_spread_is_kept():
    t = StepTiming.from_rounds([0.31, 0.10, 0.12, 0.29])  # two rounds slowed by another process
    assert t.seconds == 0.10 and t.ok and not t.crashed
    assert t.spread() == {"rounds": 4, "min_s": 0.10, "median_s": 0.205, "max_s": 0.31}
    assert StepTiming.from_seconds(math.inf).status == "out of memory" and not StepTiming.from_seconds(0.0).ok
    assert StepTiming(math.inf, "crashed (SIGSEGV)").crashed


class _FakeRunner:
    """A step that takes ``net.spec.base_features`` milliseconds (no network is built)."""

    def __init__(self, s, seed):
        self.seconds = s.net.spec.base_features / 1000.0

    def step(self):
        return self.seconds


@pytest.mark.parametrize("features, rounds", [(4, MAX_ROUNDS), (400, 3)])
def test_cheap_batches_get_more_rounds(monkeypatch, features, rounds):
    monkeypatch.setattr(step_timing, "_StepRunner", _FakeRunner)
    s = StepSetting(dataclasses.replace(NET, spec=dataclasses.replace(NET.spec, base_features=features)), 1, 3)
    timing = step_timing._time_settings([s, s], 3, 1, 0, False, step_timing.CHEAP_ROUNDS_SECONDS)
    assert [len(t.rounds) for t in timing] == [rounds, rounds]
    assert measure_step_times([s], 3, progress=False, cheap_seconds=0.0) == [features / 1000.0]


def test_the_child_measures_with_this_process_threads(one_thread):
    settings = [StepSetting(NET, 1, 3, "cpu", "fp32", cl) for cl in (False, True)]
    m = measure_in_child(settings, 2, progress=False)
    assert m.children == 1 and m.threads == torch.get_num_threads() == 1 and not m.crashes
    assert all(t.ok and 0 < t.seconds < 30 and len(t.rounds) >= 2 for t in m.timings)
    assert m.overhead_s > 0


def test_a_setting_that_kills_its_child_is_reported_crashed_and_the_others_measured(armed, one_thread):
    armed("step_probe:bf16=segv")
    settings = [StepSetting(NET, 1, 3, "cpu", p, True) for p in ("fp32", "bf16", "fp32")]
    m = measure_in_child(settings, 1, progress=False, cheap_seconds=0.0)
    assert [t.status for t in m.timings] == ["measured", "crashed (SIGSEGV)", "measured"]
    assert m.children == 2 and m.crashes == ("crashed (SIGSEGV)",)
    assert math.isinf(m.timings[1].seconds) and m.timings[0].ok and m.timings[2].ok


def test_a_python_error_in_the_child_is_raised_here(one_thread):
    bad = StepSetting(NET, 1, 3, "cpu", "fp8")  # not a precision: the child cannot build the network
    with pytest.raises(ConfigError, match="fp8"):
        probe_step_in_child(bad)
