"""When the next of a regular series of messages is due: a session's decode steps at a worker, their
results at the client. Endpoint.expect_message (worker) and MeshRuntime.await_result (client)
busy-poll around that time."""

from __future__ import annotations

import collections

# The next message is expected one median gap after the latest: a median of four gaps shrugs off
# one odd step (a prefill, a slow forward).
ARRIVALS_KEPT = 5


class Cadence:
    """The times (seconds, one clock) of a series' latest messages, and when the next is due."""

    __slots__ = ("_times",)

    def __init__(self) -> None:
        self._times: collections.deque[float] = collections.deque(maxlen=ARRIVALS_KEPT)

    def note(self, at: float) -> None:
        """A message of the series came at ``at``."""
        self._times.append(at)

    def reset(self) -> None:
        """The series broke off (a message of another kind came between): start over."""
        self._times.clear()

    def next_due(self) -> float | None:
        """When the next message is due; None until ARRIVALS_KEPT messages are noted."""
        times = self._times
        if len(times) < ARRIVALS_KEPT:
            return None
        gaps = sorted(times[i + 1] - times[i] for i in range(ARRIVALS_KEPT - 1))
        return times[-1] + gaps[len(gaps) // 2]
