"""When the next message of a steady series is due (transport/cadence.py)."""

from __future__ import annotations

import pytest

from inferencemesh.transport.cadence import ARRIVALS_KEPT, MISSES_FOR_SPREAD, WIDEST, Cadence


def test_the_next_message_is_due_one_median_gap_after_the_latest() -> None:
    cadence = Cadence()
    times = [0.0, 0.020, 0.041, 0.060, 0.080]
    for at in times[:-1]:
        cadence.note(at)
        assert cadence.next_due() is None  # too few gaps to tell a pace
    cadence.note(times[-1])
    assert len(times) == ARRIVALS_KEPT
    # Gaps 20, 21, 19, 20 ms: median 20.
    assert abs(cadence.next_due() - 0.100) < 1e-9


def test_one_odd_gap_does_not_move_the_due_time_and_a_reset_starts_over() -> None:
    cadence = Cadence()
    for at in (1.0, 1.020, 1.040, 1.140, 1.160, 1.180):  # one slow step among steady ones
        cadence.note(at)
    assert abs(cadence.next_due() - 1.200) < 1e-9  # only the latest ARRIVALS_KEPT count
    cadence.reset()
    cadence.note(2.0)
    assert cadence.next_due() is None


def steady(cadence: Cadence, gap: float, count: int, start: float = 0.0) -> float:
    """Notes ``count`` messages ``gap`` apart; returns the time of the last."""
    for n in range(count):
        cadence.note(start + n * gap)
    return start + (count - 1) * gap


def test_the_window_is_the_least_either_side_until_the_misses_tell_a_spread() -> None:
    cadence = Cadence()
    last = steady(cadence, 0.020, ARRIVALS_KEPT)
    assert cadence.next_window(0.001) == pytest.approx((last + 0.019, last + 0.021))
    # Messages right on time keep it there: a miss of 0 is below the least.
    for _ in range(MISSES_FOR_SPREAD):
        start, end = cadence.next_window(0.001)
        last = (start + end) / 2
        cadence.note(last)
    assert cadence.next_window(0.001) == pytest.approx((last + 0.019, last + 0.021))


def test_the_window_widens_to_how_far_the_latest_messages_missed_and_no_further_than_widest() -> None:
    cadence = Cadence()
    steady(cadence, 0.020, ARRIVALS_KEPT)
    # Misses of -3, +4 ms and small ones: the 2nd earliest and 2nd latest bound the window.
    misses = [-0.003, -0.0025, 0.0, 0.0005, 0.004, 0.0035, -0.0002, 0.0001]
    assert len(misses) == MISSES_FOR_SPREAD
    for miss in misses:
        start, end = cadence.next_window(0.001)
        cadence.note((start + end) / 2 + miss)  # the window is symmetric until the spread is known
    due = cadence.next_due()
    assert cadence.next_window(0.001) == pytest.approx((due - 0.0025, due + 0.0035))
    least = 0.002 / WIDEST  # WIDEST times it is 2 ms, less than either side's spread
    assert cadence.next_window(least) == pytest.approx((due - 0.002, due + 0.002))
    cadence.reset()
    steady(cadence, 0.020, ARRIVALS_KEPT, start=5.0)
    assert cadence.next_window(0.001) == pytest.approx((5.099, 5.101))  # the spread went with it
