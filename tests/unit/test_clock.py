"""medseg.clock: elapsed time over sessions, budget deadlines, progress and stop decisions, on a fake time source."""

from __future__ import annotations

import pytest

from medseg.clock import BudgetClock, Deadline, EpochClock


class FakeTime:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_deadline_counts_down_on_its_time_source():
    now = FakeTime()
    d = Deadline.after(5.0, now)
    assert d.remaining() == 5.0 and not d.expired()
    now.t += 5.0
    assert d.remaining() == 0.0 and d.expired()
    assert Deadline.after(-3.0, now).remaining() == 0.0  # a negative time left is now


def test_epoch_clock_progress_stop_and_resumed_elapsed_time():
    now = FakeTime()
    clock = EpochClock(2, 10, time_source=now)
    assert clock.deadline() is None and not clock.stops_mid_epoch
    assert clock.progress(5) == 0.25 and clock.progress(50) == 1.0
    assert not clock.should_stop(1, 10) and clock.should_stop(2, 20)
    now.t += 7.0
    clock.step_done(1.0)
    clock.step_done(2.0)
    assert clock.step_seconds == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    state = clock.state_dict()
    assert state == {"elapsed_seconds": 7.0, "step_seconds": clock.step_seconds}
    resumed = EpochClock(2, 10, time_source=now)
    resumed.load_state_dict(state)
    now.t += 1.0
    assert resumed.elapsed() == 8.0 and resumed.step_seconds == clock.step_seconds


def test_budget_clock_keeps_the_reserve_and_margin_and_never_lets_progress_go_back():
    now = FakeTime()
    reserve = [100.0]
    clock = BudgetClock(1000.0, lambda: reserve[0], started=now.t - 10.0, time_source=now)  # a 10 s refit before
    assert clock.stops_mid_epoch and clock.elapsed() == 10.0
    assert clock.deadline() == 1000.0 - 100.0 - 20.0  # margin min(30, 2% of the budget)
    assert clock.remaining() == 990.0 and clock.fraction_used() == 0.01 and not clock.expired()
    assert clock.share(0.25) == 250.0
    now.t += 430.0
    assert clock.progress(0) == pytest.approx(440.0 / 880.0)
    reserve[0] = 0.0  # a better estimate moves the deadline later: the schedule does not go back
    assert clock.progress(0) == pytest.approx(440.0 / 880.0)
    assert clock.fits(539.0) and not clock.fits(541.0) and clock.iterations_left(10.0) == 54
    clock.step_done(541.0)
    assert clock.should_stop(0, 0)
    final = clock.final_deadline()  # the end of the budget less min(2, 1%)
    assert final.remaining() == pytest.approx(1000.0 - 440.0 - 2.0)
    assert BudgetClock(1000.0, max_epochs=3, time_source=now).should_stop(3, 0)


def test_a_spent_budget_has_no_time_left():
    now = FakeTime()
    clock = BudgetClock(60.0, lambda: 100.0, time_source=now)
    assert clock.deadline() == 0.0 and clock.progress(0) == 1.0 and clock.should_stop(0, 0)
    now.t += 61.0
    assert clock.expired() and clock.final_deadline().remaining() == 0.0
