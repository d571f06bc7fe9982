"""Buffer pool: size classes, alignment, reuse, statistics, the byte cap, and pinning hooks."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from inferencemesh import _core
from inferencemesh.protocol.errors import PoolExhausted
from inferencemesh.protocol.pinning import enable_cuda_pinning

MiB = 1 << 20


@pytest.mark.parametrize("size", [0, 1, 255, 256, 257, 1000, 4096, 5000, 65537, MiB + 1, 64 * MiB + 4096])
def test_size_classes_bound_the_slack(size: int) -> None:
    capacity = _core.BufferPool.size_class(size)
    assert capacity >= max(size, 1)
    assert capacity <= max(256, size * 1.25 + 1)


def test_alignment_small_and_page_aligned_large() -> None:
    pool = _core.BufferPool(256 * MiB)
    small = [pool.acquire(n) for n in (1, 100, 3000, 40000)]
    large = [pool.acquire(n) for n in (65536, MiB, 5 * MiB + 3)]
    assert all(b.address % 64 == 0 for b in small)
    assert all(b.address % 4096 == 0 for b in large)
    assert [len(b) for b in small] == [1, 100, 3000, 40000]


def test_released_buffers_are_reused() -> None:
    pool = _core.BufferPool(64 * MiB)
    first = pool.acquire(10_000)
    address = first.address
    del first
    gc.collect()
    again = pool.acquire(9_000)  # same size class
    assert again.address == address
    stats = pool.stats()
    assert stats["fresh_allocations"] == 1 and stats["reuses"] == 1


def test_statistics_track_use_and_high_water() -> None:
    pool = _core.BufferPool(64 * MiB)
    buffers = [pool.acquire(MiB) for _ in range(4)]
    stats = pool.stats()
    assert stats["buffers_in_use"] == 4
    assert stats["bytes_in_use"] == 4 * _core.BufferPool.size_class(MiB)
    del buffers[:2]
    gc.collect()
    stats = pool.stats()
    assert stats["buffers_in_use"] == 2 and stats["buffers_free"] == 2
    assert stats["high_water"] == 4 * _core.BufferPool.size_class(MiB)
    pool.trim()
    assert pool.stats()["bytes_free"] == 0


def test_cap_raises_a_clear_error_and_recovers_after_release() -> None:
    pool = _core.BufferPool(4 * MiB)
    held = pool.acquire(3 * MiB)
    with pytest.raises(PoolExhausted, match="cap of 4194304 bytes exceeded"):
        pool.acquire(2 * MiB)
    assert isinstance(PoolExhausted("x"), MemoryError)
    del held
    gc.collect()
    # The cached 3 MiB block is evicted to make room for a different size class.
    assert len(pool.acquire(2 * MiB)) == 2 * MiB
    assert pool.stats()["bytes_in_use"] <= 4 * MiB


def test_concurrent_acquire_and_release_keep_counts_consistent() -> None:
    pool = _core.BufferPool(512 * MiB)

    def churn(seed: int) -> None:
        for i in range(2000):
            buf = pool.acquire((seed * 7919 + i * 104729) % 300_000)
            memoryview(buf)[:1] = b"x" if len(buf) else b""
            del buf

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = pool.stats()
    assert stats["buffers_in_use"] == 0 and stats["bytes_in_use"] == 0


def test_pin_hooks_see_large_fresh_buffers_and_unpin_before_free() -> None:
    pool = _core.BufferPool(256 * MiB)
    pinned: dict[int, int] = {}
    pool.set_pin_hooks(lambda address, size: pinned.setdefault(address, size) > 0, pinned.pop, 2 * MiB)
    small = pool.acquire(MiB)
    big = pool.acquire(4 * MiB)
    assert not small.pinned and big.pinned
    assert pinned == {big.address: big.capacity}
    assert pool.stats()["bytes_pinned"] == big.capacity
    del big
    gc.collect()
    pool.trim()
    assert pinned == {}
    assert pool.stats()["bytes_pinned"] == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_failing_pin_hook_leaves_the_buffer_pageable() -> None:
    pool = _core.BufferPool(64 * MiB)

    def refuse(address: int, size: int) -> bool:
        raise RuntimeError("no CUDA here")

    pool.set_pin_hooks(refuse, lambda address: None, 0)
    assert not pool.acquire(MiB).pinned


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pinning_makes_host_to_device_copies_async() -> None:
    pool = _core.BufferPool(256 * MiB)
    assert enable_cuda_pinning(pool, min_bytes=MiB)
    buf = pool.acquire(16 * MiB)
    assert buf.pinned
    host = torch.frombuffer(buf, dtype=torch.uint8)
    assert host.is_pinned()
    device = host.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert device.numel() == 16 * MiB


def test_enable_cuda_pinning_reports_no_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by the pinning test")
    assert enable_cuda_pinning(_core.BufferPool(MiB)) is False
