"""Host-to-device copy time of 1 MiB and 16 MiB buffers: pooled buffers page-locked through
enable_cuda_pinning vs ordinary pageable memory, side by side. Needs a CUDA GPU.

    python bench/bench_pinning.py
"""

from __future__ import annotations

import statistics
import sys

import torch

from inferencemesh import _core
from inferencemesh.protocol.pinning import enable_cuda_pinning

MiB = 1 << 20


def copy_ms(host: torch.Tensor, repeat: int = 50) -> float:
    device = torch.empty_like(host, device="cuda")
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        device.copy_(host, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: torch.cuda.is_available() is False")
        return 1
    pool = _core.BufferPool(256 * MiB)
    enable_cuda_pinning(pool, min_bytes=MiB)
    print(f"device: {torch.cuda.get_device_name()}")
    for size in (MiB, 16 * MiB):
        buffer = pool.acquire(size)
        pinned = torch.frombuffer(buffer, dtype=torch.uint8)
        pageable = torch.empty(size, dtype=torch.uint8)
        assert buffer.pinned and pinned.is_pinned()
        p, q = copy_ms(pinned), copy_ms(pageable)
        print(f"{size // MiB:3d} MiB H2D: pinned {p:.3f} ms, pageable {q:.3f} ms, speedup {q / p:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
