"""Per-session KV caches of one span under a byte budget.

A session reserves ``max_length`` positions up front, so a worker can promise (and announce) how
many more tokens it can hold, and a forward can never run out of cache memory halfway. Each session
owns its own tensors: sessions of different lengths can be batched together and join or leave a
batch between steps (continuous batching) without moving any cache data.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

import torch

from inferencemesh.compute.errors import CacheFull, CacheOverflow, DuplicateSession, UnknownSession


@dataclass
class SessionCache:
    """Keys and values of one session for every block of a span.

    ``keys``/``values`` have shape ``[num_layers, num_kv_heads, max_length, head_dim]``; only the
    first ``length`` positions are valid.
    """

    session_id: Hashable
    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0
    last_used: float = field(default_factory=time.monotonic)
    freed: bool = False  # set when its manager frees it: the session has ended
    last_decode_s: float = 0.0  # the latest decode batch this session was in: its forward's seconds

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    @property
    def remaining(self) -> int:
        return self.max_length - self.length

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def truncate(self, position: int) -> None:
        """Rolls the session back so that position ``position`` is the next one written.

        Used to retry a step or to replay a span's input history after a failover.
        """
        if not 0 <= position <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {position}")
        self.length = position

    def check_room(self, num_tokens: int) -> None:
        if num_tokens > self.remaining:
            raise CacheOverflow(
                f"session {self.session_id!r}: {num_tokens} more tokens exceed its max length "
                f"{self.max_length} (at position {self.length})"
            )


class KVCacheManager:
    """Allocates session caches for a span of ``num_layers`` blocks within ``budget_bytes``."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        budget_bytes: int,
        max_context: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.budget_bytes = budget_bytes
        self.max_context = max_context
        self.dtype = dtype
        self.device = torch.device(device)
        self._sessions: dict[Hashable, SessionCache] = {}
        self._reserved_bytes = 0

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one position of one session costs across the span (keys and values)."""
        element_size = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    @property
    def reserved_bytes(self) -> int:
        return self._reserved_bytes

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self._reserved_bytes

    @property
    def free_tokens(self) -> int:
        """How many more positions (summed over new sessions) the budget can hold."""
        return self.free_bytes // self.bytes_per_token

    def allocate(self, session_id: Hashable, max_length: int) -> SessionCache:
        if session_id in self._sessions:
            raise DuplicateSession(f"session {session_id!r} already has a KV cache")
        if not 0 < max_length <= self.max_context:
            raise ValueError(f"max_length must be in 1..{self.max_context}, got {max_length}")
        needed = max_length * self.bytes_per_token
        if needed > self.free_bytes:
            raise CacheFull(needed, self.free_bytes)
        shape = (self.num_layers, self.num_kv_heads, max_length, self.head_dim)
        try:
            keys = torch.empty(shape, dtype=self.dtype, device=self.device)
            values = torch.empty(shape, dtype=self.dtype, device=self.device)
        except (torch.OutOfMemoryError, RuntimeError):
            # The budget was set larger than the device can hold (CUDA raises OutOfMemoryError, the
            # CPU allocator a RuntimeError): refuse the session, never crash.
            raise CacheFull(needed, 0) from None
        cache = SessionCache(session_id, keys, values)
        self._sessions[session_id] = cache
        self._reserved_bytes += needed
        return cache

    def get(self, session_id: Hashable) -> SessionCache:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise UnknownSession(session_id) from None

    def free(self, session_id: Hashable) -> None:
        """Releases a session's cache; freeing an unknown (e.g. already expired) session is a no-op."""
        cache = self._sessions.pop(session_id, None)
        if cache is not None:
            cache.freed = True
            self._reserved_bytes -= cache.max_length * self.bytes_per_token

    def free_idle(self, max_idle_s: float, now: float | None = None) -> list[Hashable]:
        """Frees sessions unused for longer than ``max_idle_s``; returns their ids."""
        now = time.monotonic() if now is None else now
        expired = [sid for sid, cache in self._sessions.items() if now - cache.last_used > max_idle_s]
        for session_id in expired:
            self.free(session_id)
        return expired

    def __contains__(self, session_id: Hashable) -> bool:
        return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[SessionCache]:
        return iter(list(self._sessions.values()))
