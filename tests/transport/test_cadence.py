"""When the next message of a steady series is due (transport/cadence.py)."""

from __future__ import annotations

from inferencemesh.transport.cadence import ARRIVALS_KEPT, Cadence


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
