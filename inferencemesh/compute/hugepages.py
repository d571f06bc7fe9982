"""Weights in transparent huge pages (Linux, CPU).

Batch-1 decode streams every weight once per token, so each 4 KiB page of weights costs a page
translation per token: ~35,000 for a 10-block SmolLM2 span. In 2 MiB pages that falls to ~70, and
the same span's forward runs ~9 % faster on the 2-core VM (``python bench/bench_hugepages.py``).
torch's allocator does not ask for huge pages and the kernel here grants them only where asked
(``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise``), so the weights are copied into one
anonymous mapping, 2 MiB aligned and advised ``MADV_HUGEPAGE`` before anything touches it. Where the
platform cannot do this the tensors stay where they are: the result is the same, only slower.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Sequence
from pathlib import Path

import torch

from inferencemesh.compute.linear import Projection

log = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20
_ALIGN = 64  # each tensor starts on a cache line
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether this kernel can back an advised mapping with transparent huge pages."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in _THP_SETTING.read_text()
    except OSError:
        return False


def place_in_huge_pages(projections: Sequence[Projection]) -> None:
    """Moves the weights of CPU ``projections``, with their shapes and strides, into one huge-page
    mapping, one at a time, so that each original can be freed before the next is copied.

    Each weight must be dense in some order (contiguous, or a transposed contiguous 2-D weight).
    Where huge pages are unavailable or the mapping fails, the weights stay where they are.
    """
    on_cpu = [p for p in projections if p.device.type == "cpu"]
    regions = _regions([p.weight for p in on_cpu])
    if regions is not None:
        for projection, region in zip(on_cpu, regions, strict=True):
            projection.weight = _copy(projection.weight, region)


def _regions(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """Byte regions, one per tensor, of a new mapping advised MADV_HUGEPAGE; None where unavailable."""
    if not tensors or not huge_pages_available():
        return None
    for tensor in tensors:
        if tensor.device.type != "cpu" or not _dense(tensor):
            raise ValueError(f"cannot place a {tensor.device} tensor with strides {tensor.stride()}")
    sizes = [tensor.numel() * tensor.element_size() for tensor in tensors]
    total = sum(-(-size // _ALIGN) * _ALIGN for size in sizes)
    try:
        mapping = mmap.mmap(-1, total + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        whole = torch.frombuffer(mapping, dtype=torch.uint8)  # its tensors keep the mapping alive
        start = -whole.data_ptr() % HUGE_PAGE_BYTES
        mapping.madvise(mmap.MADV_HUGEPAGE, start, total)  # before the copies fault the pages in
    except (OSError, ValueError) as exc:
        log.debug("weights stay in regular pages: %s", exc)
        return None
    regions = []
    for size in sizes:
        regions.append(whole[start : start + size])
        start += -(-size // _ALIGN) * _ALIGN
    return regions


def _copy(tensor: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    return torch.as_strided(region.view(tensor.dtype), tensor.shape, tensor.stride()).copy_(tensor)


def _dense(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() or (tensor.dim() == 2 and tensor.t().is_contiguous())
