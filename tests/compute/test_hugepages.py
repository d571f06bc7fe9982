"""Weights in huge pages: same values and layout, one aligned mapping, huge pages where the kernel allows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inferencemesh.compute.hugepages import HUGE_PAGE_BYTES, huge_pages_available, place_in_huge_pages
from inferencemesh.compute.linear import Projection
from inferencemesh.compute.span import Span

needs_thp = pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages here")


def anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_copies_keep_values_shapes_and_strides_in_one_aligned_mapping() -> None:
    torch.manual_seed(0)
    # float32 weights are transposed views (column-major), reduced precision ones contiguous.
    projections = [
        Projection(torch.randn(3000, 700)),
        Projection(torch.randn(5, 7, dtype=torch.bfloat16)),
        Projection(torch.randn(11, 3)),
        Projection(torch.randn(1000, 600, dtype=torch.float16)),
    ]
    tensors = [p.weight for p in projections]
    place_in_huge_pages(projections)
    copies = [p.weight for p in projections]
    for original, copy in zip(tensors, copies, strict=True):
        assert copy.dtype == original.dtype and copy.shape == original.shape
        assert copy.stride() == original.stride()
        assert torch.equal(copy, original)
        assert copy.data_ptr() != original.data_ptr() and copy.data_ptr() % 64 == 0
    assert copies[0].data_ptr() % HUGE_PAGE_BYTES == 0
    ends = [c.data_ptr() + c.numel() * c.element_size() for c in copies]
    assert all(end <= nxt.data_ptr() for end, nxt in zip(ends, copies[1:], strict=False))  # no overlap
    assert anon_huge_kib(copies[0].data_ptr()) >= HUGE_PAGE_BYTES // 1024


@needs_thp
def test_tensors_it_cannot_place_are_refused() -> None:
    projection = Projection(torch.randn(8, 8))
    projection.weight = torch.randn(8, 8)[:, ::2]
    with pytest.raises(ValueError, match="strides"):
        place_in_huge_pages([projection])


def test_a_loaded_span_computes_the_same_with_or_without_huge_pages(smollm2_dir: Path) -> None:
    placed = Span.load(smollm2_dir, 0, 2, progress=False)
    regular = Span.load(smollm2_dir, 0, 2, progress=False, huge_pages=False)
    weight = placed.blocks[0].gate_up.weight
    if huge_pages_available():
        assert anon_huge_kib(weight.data_ptr()) > 0
    hidden = torch.randn(5, placed.config.hidden_size, generator=torch.Generator().manual_seed(1))
    outputs = []
    for span in (placed, regular):
        cache = span.cache_manager(1 << 24).allocate("s", 8)
        outputs.append(torch.cat([span.prefill(hidden, cache), span.decode(hidden[:1], [cache])]))
    assert torch.equal(outputs[0], outputs[1])
