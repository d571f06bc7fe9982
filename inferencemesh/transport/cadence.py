"""When the next of a regular series of messages is due, and how far from then it may come: a
session's decode steps at a worker, their results at the client. Endpoint.expect_message (worker)
and MeshRuntime.await_result (client) busy-poll in that window."""

from __future__ import annotations

import collections

# The next message is expected one median gap after the latest: a median of four gaps shrugs off
# one odd step (a prefill, a slow forward).
ARRIVALS_KEPT = 5
# How far the latest messages came from their due times, for the window of the next: the second
# earliest and the second latest of these (~6th and ~94th percentiles) bound it, once there are
# MISSES_FOR_SPREAD of them. Their spread changes from hour to hour on a shared machine (+-1.5 ms in
# one hour, +-3 ms in the next, for a session's steps in docs/benchmarks.md): a fixed window caught
# 80-90 % of the steps in the first and 65 % in the second.
MISSES_KEPT = 16
MISSES_FOR_SPREAD = 8
# A window reaches at most this many times its least width either side of the due time. On a noisy
# host the steps spread wider than 4x a 1 ms least: there, capped at 4x, the workers' windows caught
# 40-108 of 240 steps a round, capped at 10x 86-159, and the hop cost 7-18 % less (docs/benchmarks.md).
WIDEST = 10.0


class Cadence:
    """The times (seconds, one clock) of a series' latest messages, and when the next is due."""

    __slots__ = ("_due", "_misses", "_times")

    def __init__(self) -> None:
        self._times: collections.deque[float] = collections.deque(maxlen=ARRIVALS_KEPT)
        self._misses: collections.deque[float] = collections.deque(maxlen=MISSES_KEPT)
        self._due: float | None = None  # what next_window last foretold, for the miss of the next

    def note(self, at: float) -> None:
        """A message of the series came at ``at``."""
        if self._due is not None:
            self._misses.append(at - self._due)
            self._due = None
        self._times.append(at)

    def reset(self) -> None:
        """The series broke off (a message of another kind came between): start over."""
        self._times.clear()
        self._misses.clear()
        self._due = None

    def next_due(self) -> float | None:
        """When the next message is due; None until ARRIVALS_KEPT messages are noted."""
        times = self._times
        if len(times) < ARRIVALS_KEPT:
            return None
        gaps = sorted(times[i + 1] - times[i] for i in range(ARRIVALS_KEPT - 1))
        return times[-1] + gaps[len(gaps) // 2]

    def next_window(self, least: float) -> tuple[float, float] | None:
        """(start, end): when the next message should come, the due time with at least ``least``
        either side, and as much more as the latest messages missed their due times by (at most
        WIDEST times ``least``). None until a pace is known. Remembers the due time, to learn how
        far the next message misses it."""
        due = self._due = self.next_due()
        if due is None:
            return None
        early = late = least
        if len(self._misses) >= MISSES_FOR_SPREAD:
            misses = sorted(self._misses)
            widest = WIDEST * least
            early = min(widest, max(least, -misses[1]))
            late = min(widest, max(least, misses[-2]))
        return due - early, due + late
