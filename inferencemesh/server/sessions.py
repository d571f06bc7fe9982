"""Inference sessions of one worker, isolated per client.

A session is keyed by the authenticated peer id of the client that opened it and a session id the
client chose, and guarded by a 128-bit token the client sent when opening it. Steps reach the worker
through the chain (from the previous worker, not from the client), so the token is what proves a step
belongs to the session: a client that did not open it cannot name it, let alone step it.
"""

from __future__ import annotations

import asyncio
import heapq
import hmac
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from inferencemesh.compute import errors as compute_errors
from inferencemesh.compute.kv_cache import KVCacheManager, SessionCache
from inferencemesh.p2p.identity import short_id
from inferencemesh.protocol.frames import Message
from inferencemesh.protocol.messages import CacheFull, TooLarge, UnknownSession
from inferencemesh.server.scheduler import Burst
from inferencemesh.transport.cadence import Cadence

log = logging.getLogger(__name__)

SESSION_ID_BYTES = 16
TOKEN_BYTES = 16


@dataclass(order=True)
class QueuedStep:
    """A validated STEP waiting for its turn in its session."""

    step_id: int
    position: int = field(compare=False)
    hidden: torch.Tensor = field(compare=False)  # [tokens, hidden_size]
    chain: list[list[Any]] = field(compare=False)  # the hops after this worker
    message: Message = field(compare=False)
    burst: Burst | None = field(compare=False, default=None)  # the steps of other sessions it came with
    # hidden.shape[0], kept: a torch call costs a few us of a step's way with the caches cold.
    rows: int = field(compare=False, init=False)

    def __post_init__(self) -> None:
        self.rows = self.hidden.shape[0]


@dataclass
class ServerSession:
    """One client's session: its cache, and its steps in the order the client sent them.

    A client's step ids only grow, so they give the order in which steps must run, whatever order
    the network delivered them in (each message travels on its own QUIC stream). At most one step
    of a session is computing at a time (``running``).
    """

    client: bytes
    session_id: bytes
    token: bytes
    cache: SessionCache
    last_step: int = -1  # id of the latest step run
    running: bool = False
    pending: list[QueuedStep] = field(default_factory=list)  # a heap ordered by step id
    gap_timer: asyncio.TimerHandle | None = None  # waiting for a step that arrived late
    prepared: Any = None  # the outgoing message of the expected next step (service.py: _prepare_next)
    # When its latest one-row steps started (time.monotonic()), back to its last longer step: they
    # foretell the next one's arrival (service.py: _expect_next_step).
    decode_starts: Cadence = field(default_factory=Cadence)

    @property
    def label(self) -> str:
        return f"{short_id(self.client)}/{self.session_id.hex()[:8]}"

    def queue(self, step: QueuedStep) -> None:
        heapq.heappush(self.pending, step)

    def next_step(self) -> QueuedStep | None:
        """The step that runs next, if any; None when none is queued or an earlier step is missing.

        The next step is the oldest that can run (its position is at most the cache length). Older
        steps that cannot run were overtaken: the client has started over from an earlier position
        (a replay after a failover), so they are dropped.
        """
        if self.running or not self.pending:
            return None
        if self.pending[0].position <= self.cache.length:  # the oldest can run: the usual case
            return heapq.heappop(self.pending)
        runnable = [step for step in self.pending if step.position <= self.cache.length]
        if not runnable:
            return None
        first = min(runnable)
        overtaken = sum(step < first for step in self.pending)
        if overtaken:
            log.info("%d steps of session %s dropped: a later step starts over", overtaken, self.label)
        self.pending = [step for step in self.pending if step > first]
        heapq.heapify(self.pending)
        return first

    def waits_for_earlier_step(self) -> bool:
        """Steps are queued, none is computing, and none can run before an earlier one arrives."""
        length = self.cache.length
        return not self.running and bool(self.pending) and all(s.position > length for s in self.pending)

    def pop_first(self) -> QueuedStep:
        return heapq.heappop(self.pending)

    def drop_prepared(self) -> Any:
        """Takes the prepared next step away (withdrawing what it waits for); returns it, or None."""
        prepared, self.prepared = self.prepared, None
        if prepared is not None:
            prepared.release()
        return prepared

    def discard_pending(self) -> None:
        self.drop_prepared()
        self.pending.clear()
        if self.gap_timer is not None:
            self.gap_timer.cancel()
            self.gap_timer = None


class SessionRegistry:
    def __init__(self, caches: KVCacheManager, max_session_length: int) -> None:
        self.caches = caches
        self.max_session_length = max_session_length
        self._sessions: dict[tuple[bytes, bytes], ServerSession] = {}

    def open(self, client: bytes, session_id: bytes, token: bytes, max_length: int) -> ServerSession:
        if len(session_id) != SESSION_ID_BYTES or len(token) != TOKEN_BYTES:
            raise UnknownSession(f"session ids and tokens are {SESSION_ID_BYTES} bytes")
        if not 0 < max_length <= self.max_session_length:
            raise TooLarge(f"max_length must be in 1..{self.max_session_length}, got {max_length}")
        key = (client, session_id)
        if key in self._sessions:
            raise UnknownSession("this session id is already open")
        try:
            cache = self.caches.allocate(key, max_length)
        except compute_errors.CacheFull as exc:
            raise CacheFull(
                f"KV cache full: {max_length} tokens requested, {self.caches.free_tokens} free"
            ) from exc
        session = ServerSession(client, session_id, token, cache)
        self._sessions[key] = session
        log.info(
            "session %s opened (max_length %d, %d cache tokens free)",
            session.label,
            max_length,
            self.caches.free_tokens,
        )
        return session

    def get(self, client: bytes, session_id: bytes, token: bytes) -> ServerSession:
        session = self._sessions.get((client, session_id))
        # The same answer for a missing session and a wrong token: a stranger learns nothing.
        if session is None or not hmac.compare_digest(session.token, token):
            raise UnknownSession("unknown session (never opened, closed, expired, or not yours)")
        return session

    def close(self, client: bytes, session_id: bytes, token: bytes) -> None:
        session = self.get(client, session_id, token)
        self._drop(session, "closed")

    def expire_idle(self, max_idle_s: float) -> int:
        expired = self.caches.free_idle(max_idle_s)
        for key in expired:
            session = self._sessions.pop(key, None)
            if session is not None:
                session.discard_pending()
                log.info("session %s expired after %.0f s idle", session.label, max_idle_s)
        return len(expired)

    def close_all(self) -> None:
        for session in list(self._sessions.values()):
            self._drop(session, "closed at shutdown")

    def _drop(self, session: ServerSession, why: str) -> None:
        self._sessions.pop((session.client, session.session_id), None)
        session.discard_pending()
        self.caches.free((session.client, session.session_id))
        log.info("session %s %s at length %d", session.label, why, session.cache.length)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[ServerSession]:
        return iter(list(self._sessions.values()))
