"""KV cache manager: byte budget, typed errors, free-token accounting, expiry."""

from __future__ import annotations

import pytest
import torch

from inferencemesh.compute.errors import CacheFull, DuplicateSession, UnknownSession
from inferencemesh.compute.kv_cache import KVCacheManager

# SmolLM2 geometry for a 10-block span: 2 (k, v) * 10 blocks * 3 KV heads * 64 dims * 4 bytes.
BYTES_PER_TOKEN = 2 * 10 * 3 * 64 * 4


def manager(budget_tokens: int, dtype: torch.dtype = torch.float32) -> KVCacheManager:
    return KVCacheManager(
        num_layers=10,
        num_kv_heads=3,
        head_dim=64,
        budget_bytes=budget_tokens * BYTES_PER_TOKEN,
        max_context=8192,
        dtype=dtype,
    )


def test_budget_accounting_and_cache_full() -> None:
    caches = manager(budget_tokens=1000)
    assert caches.bytes_per_token == BYTES_PER_TOKEN
    assert caches.free_tokens == 1000
    first = caches.allocate("a", 600)
    assert first.keys.shape == (10, 3, 600, 64) and first.length == 0
    assert caches.free_tokens == 400 and caches.reserved_bytes == 600 * BYTES_PER_TOKEN
    with pytest.raises(CacheFull) as error:
        caches.allocate("b", 401)
    assert error.value.requested_bytes == 401 * BYTES_PER_TOKEN
    assert error.value.free_bytes == 400 * BYTES_PER_TOKEN
    assert "b" not in caches and caches.free_tokens == 400  # a refused session reserves nothing
    caches.allocate("b", 400)
    assert caches.free_tokens == 0
    caches.free("a")
    assert caches.free_tokens == 600 and len(caches) == 1
    caches.free("a")  # closing twice (or after expiry) is harmless
    assert caches.free_tokens == 600


def test_bfloat16_halves_the_cost() -> None:
    assert manager(10, torch.bfloat16).bytes_per_token == BYTES_PER_TOKEN // 2


def test_session_errors() -> None:
    caches = manager(budget_tokens=100)
    caches.allocate("a", 10)
    with pytest.raises(DuplicateSession):
        caches.allocate("a", 10)
    with pytest.raises(UnknownSession):
        caches.get("nope")
    with pytest.raises(ValueError, match="max_length"):
        caches.allocate("big", 8193)
    with pytest.raises(ValueError, match="max_length"):
        caches.allocate("empty", 0)


def test_idle_sessions_expire() -> None:
    caches = manager(budget_tokens=100)
    old, fresh = caches.allocate("old", 10), caches.allocate("fresh", 10)
    old.last_used, fresh.last_used = 100.0, 150.0
    assert caches.free_idle(max_idle_s=30.0, now=160.0) == ["old"]
    assert "old" not in caches and "fresh" in caches and caches.free_tokens == 90


def test_truncate_only_rolls_back() -> None:
    cache = manager(budget_tokens=100).allocate("a", 10)
    cache.length = 6
    cache.truncate(4)
    assert cache.length == 4 and cache.remaining == 6
    with pytest.raises(ValueError):
        cache.truncate(5)


def test_budget_beyond_memory_is_refused_not_a_crash() -> None:
    # A misconfigured budget (here 4 EiB) must not take the worker down when a session asks for it.
    caches = KVCacheManager(
        num_layers=30, num_kv_heads=3, head_dim=64, budget_bytes=1 << 62, max_context=1 << 40
    )
    with pytest.raises(CacheFull):
        caches.allocate("huge", 1 << 36)  # ~3 PB of cache
    assert len(caches) == 0 and caches.reserved_bytes == 0
