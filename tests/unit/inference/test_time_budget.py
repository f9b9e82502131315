"""Sliding-window time estimates, the fixed order of reductions a per-case budget goes through, the default
budget, and the record (hand-made numbers)."""

from __future__ import annotations

import json

import pytest

from medseg.inference import time_budget as tb
from medseg.inference.prediction_record import CaseRecord, record_document
from medseg.inference.time_budget import (
    CaseBudget,
    CaseSetting,
    NetworkJob,
    case_seconds,
    choose_setting,
    default_seconds_per_case,
    pass_options,
    reduction_order,
    windows_per_pass,
)

PATCH = (20, 20, 20)
STRIDE = (8, 8, 8)
SHAPE = (40, 40, 40)  # 3 positions per axis at step 0.5: 27 windows
OVERHEAD = tb.CASE_SECONDS + 40**3 * 4 * tb.VOXEL_CLASS_SECONDS  # per case, 4 classes


def test_pass_options_go_from_the_full_tta_down_to_none():
    assert pass_options((0, 1, 2), STRIDE) == [8, 4, 2, 1]
    assert pass_options((2,), STRIDE) == [4, 2, 1]  # 2 flips x 2 shifts, then the flips alone, then none
    assert pass_options((0, 1, 2), STRIDE, use_tta=False) == [1]


def test_case_estimate_is_windows_times_passes_times_forward_time():
    assert windows_per_pass(SHAPE, PATCH, [(0, 0, 0)]) == 27
    assert case_seconds(SHAPE, PATCH, 4, 0.1, 1, (0, 1, 2), STRIDE) == pytest.approx(27 * 0.1 + OVERHEAD)
    assert case_seconds(SHAPE, PATCH, 4, 0.1, 8, (0, 1, 2), STRIDE) == pytest.approx(8 * 27 * 0.1 + OVERHEAD)
    # 2 flips x 2 shifts: the shifted volume (40 + 2*2 per axis) takes 4 positions per axis
    assert windows_per_pass(SHAPE, PATCH, [(-2, -2, -2), (2, 2, 2)]) == 2 * 64
    assert case_seconds(SHAPE, PATCH, 4, 0.1, 4, (2,), STRIDE) == pytest.approx(2 * 2 * 64 * 0.1 + OVERHEAD)
    # 2D: every slice of the volume is a window position
    assert windows_per_pass(SHAPE, (20, 20), [(0, 0)]) == 40 * 9
    # less overlap: 60 voxels over a 20-voxel patch take 5 positions at step 0.5, 4 at 2/3 or 3/4, 3 at 1
    assert [windows_per_pass((60, 60, 60), PATCH, [(0, 0, 0)], s) for s in (0.5, 0.666667, 0.75, 1.0)] == [
        125,
        64,
        64,
        27,
    ]


def _settings(options):
    return [(o.passes, o.overlap) for o in options]


def test_reduction_order_is_tta_passes_first_then_window_overlap():
    assert _settings(reduction_order([8, 4, 2, 1])) == [
        (8, 0.5),
        (4, 0.5),
        (2, 0.5),
        (1, 0.5),
        (1, 0.333),
        (1, 0.25),
        (1, 0.0),
    ]
    # --no-tta: only the overlap is left to reduce; a step asked for above 0.5 starts there
    assert _settings(reduction_order([1])) == [(1, 0.5), (1, 0.333), (1, 0.25), (1, 0.0)]
    assert _settings(reduction_order([4, 2, 1], step=0.75)) == [(4, 0.25), (2, 0.25), (1, 0.25), (1, 0.0)]
    assert _settings(reduction_order([8, 4, 2, 1], step=0.25)) == [
        (8, 0.75),
        (4, 0.75),
        (2, 0.75),
        (1, 0.75),
        (1, 0.5),
        (1, 0.333),
        (1, 0.25),
        (1, 0.0),
    ]


def _job(key="3d/unet", shape=(60, 60, 60)):
    return NetworkJob(key, shape, PATCH, (0, 1, 2), STRIDE, 8)


def test_the_first_setting_that_fits_is_chosen_in_the_fixed_order():
    options = reduction_order([8, 4, 2, 1])
    spw = {"3d/unet": 0.01}
    # windows: 125 at step 0.5, 64 at 2/3 and 3/4, 27 at 1 -> seconds 8 x 1.25, 4 x 1.25, ..., 0.64, 0.27
    assert choose_setting([_job()], spw, options, 100.0) == (CaseSetting(8, 0.5), pytest.approx(10.0))
    assert choose_setting([_job()], spw, options, 5.0) == (CaseSetting(4, 0.5), pytest.approx(5.0))
    assert choose_setting([_job()], spw, options, 1.3) == (CaseSetting(1, 0.5), pytest.approx(1.25))
    assert choose_setting([_job()], spw, options, 1.0)[0] == CaseSetting(1, 0.666667)  # 1/3 overlap: 64 windows
    assert choose_setting([_job()], spw, options, 0.5) == (CaseSetting(1, 1.0), pytest.approx(0.27))
    # nothing fits: the cheapest setting, with its estimate
    assert choose_setting([_job()], spw, options, 0.01) == (CaseSetting(1, 1.0), pytest.approx(0.27))
    # measured twice the estimate so far: the correction halves what fits
    assert choose_setting([_job()], spw, options, 5.0, correction=2.0)[0] == CaseSetting(2, 0.5)


def test_ensemble_members_share_the_budget():
    options = reduction_order([8, 4, 2, 1])
    one = choose_setting([_job()], {"3d/unet": 0.01}, options, 7.0)
    # five folds of one network: five times the windows at the same seconds per window
    five = choose_setting([_job()] * 5, {"3d/unet": 0.01}, options, 7.0)
    assert one[0] == CaseSetting(4, 0.5) and five == (CaseSetting(1, 0.5), pytest.approx(5 * 1.25))
    # a 2D member adds its slices: 60 slices x 16 windows of (20, 20) at step 0.5 x 4 flips x 0.001 s
    two_d = NetworkJob("2d/unet", (60, 60, 60), (20, 20), (0, 1), (8, 8), 4)
    mixed = choose_setting([_job(), two_d], {"3d/unet": 0.01, "2d/unet": 0.001}, options, 100.0)
    assert mixed == (CaseSetting(8, 0.5), pytest.approx(10.0 + 60 * 25 * 4 * 0.001))


def test_case_budget_subtracts_what_the_case_spent_and_learns_from_measurements():
    clock = CaseBudget(10.0, reduction_order([8, 4, 2, 1]))
    spw = {"3d/unet": 0.01}
    # 10 s - 4 s reading - 1 s export leaves 5 s: 4 passes (5.0 s)
    setting, record, raw = clock.choose([_job()], spw, spent=4.0, write_raw=1.0)
    assert setting == CaseSetting(4, 0.5) and raw == pytest.approx(5.0)
    assert (record.tta_passes, record.overlap, record.full_tta_passes, record.full_overlap) == (4, 0.5, 8, 0.5)
    assert record.estimated_seconds == pytest.approx(10.0) and record.budget_seconds == 10.0
    # the network took twice its estimate, the export half: the next case expects that
    clock.network_done(raw, 10.0)
    clock.write_done(1.0, 0.5)
    assert clock.network_correction == pytest.approx(2.0) and clock.write_estimate(1.0) == pytest.approx(0.5)
    setting, record, _ = clock.choose([_job()], spw, spent=4.0, write_raw=1.0)
    assert setting == CaseSetting(2, 0.5) and record.estimated_seconds == pytest.approx(4.0 + 2 * 2.5 + 0.5)


def test_default_budget_is_a_tenth_of_the_training_budget_over_20_cases_on_the_cpu():
    assert default_seconds_per_case(30, "cpu") == pytest.approx(9.0)
    assert default_seconds_per_case(None, "cpu") is None  # full schedule: no limit
    assert default_seconds_per_case(30, "cuda") is None


def test_record_says_what_was_used_and_whether_the_budget_held():
    held = CaseRecord(
        8,
        0.5,
        8,
        0.5,
        budget_seconds=9.0,
        estimated_seconds=8.0,
        load_seconds=1.0,
        network_seconds=6.0,
        write_seconds=1.0,
    )
    over = CaseRecord(
        1,
        0.0,
        8,
        0.5,
        budget_seconds=9.0,
        estimated_seconds=8.5,
        load_seconds=1.0,
        measure_seconds=0.5,
        network_seconds=7.0,
        write_seconds=1.0,
    )
    assert (held.seconds, held.held, held.reduced) == (8.0, True, False)
    assert (over.seconds, over.held, over.reduced) == (9.5, False, True)
    assert CaseRecord(8, 0.5, 8, 0.5).held is None
    doc = record_document({"b": over, "a": held.to_dict()}, 9.0, "given", reduction_order([8, 4, 2, 1]))
    doc = json.loads(json.dumps(doc))
    assert list(doc["cases"]) == ["a", "b"] and doc["cases"]["b"]["tta_passes"] == 1
    assert doc["cases"]["b"]["held"] is False and doc["cases"]["b"]["overlap"] == 0.0
    assert doc["summary"] == {"cases": 2, "mean_seconds": 8.75, "held": 1, "reduced": 1}
    assert doc["reduction_order"][0] == {"tta_passes": 8, "overlap": 0.5} and doc["time_budget_per_case"] == 9.0
