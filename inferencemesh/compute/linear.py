"""Linear layers with the weight layout and kernel that stream fastest on CPU for their dtype.

Decode streams every weight once per step, so for the few rows of a decode batch (or a small prefill
chunk) the matmul kernel's streaming speed is the speed. Measured on the 2-core VM (one thread, 20
weights of SmolLM2's shapes, 64 MB, streamed from memory; bench/bench_compute.py and
docs/benchmarks.md):

- float32, 1 row: MKL streams a column-major weight at ~23 GB/s against ~16 GB/s for row-major, but
  with 2-4 rows its GEMM packs the weight on every call and takes 1.7-1.9x the one-row time. Computing
  ``(W @ x.T).T`` on the row-major weight instead lets MKL pack only the few rows of ``x`` and stream
  ``W`` once: 2 rows cost the same as 1, 4 rows 1.25x. MKL runs that product as a GEMV (slow) for one
  row and is slower for odd row counts, so rows are padded to an even count (1 -> 2, 3 -> 4). Beyond
  SKINNY_ROWS rows the plain ``x @ W.T`` is as fast or faster.
- bfloat16/float16: oneDNN streams the row-major weight 1.4x (bf16) and 10x (fp16) faster than the
  column-major one.

Splitting a float32 weight into halves for a two-thread ``bmm`` streamed at ~32 GB/s on an idle
machine, but its parallel region stalls for milliseconds whenever the machine is oversubscribed
(several workers on few cores), so it is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SKINNY_ROWS = 4  # float32 inputs of at most this many rows use the (W @ x.T).T product


class Projection:
    """``y = x @ weight.T + bias`` for ``x`` ``[rows, in_features]``; ``weight`` is HF's ``[out, in]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.weight = weight.contiguous()
        self._skinny = weight.dtype == torch.float32 and weight.device.type == "cpu"

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def nbytes(self) -> int:
        tensors = [self.weight] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if not self._skinny or rows > SKINNY_ROWS:
            return F.linear(x, self.weight, self.bias)
        padded = torch.cat([x, x[-1:]]) if rows % 2 else x
        y = torch.mm(self.weight, padded.t()).t()[:rows].contiguous()
        return y if self.bias is None else y + self.bias

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``weight[indices]`` (``[len(indices), in_features]``): a tied LM head's embeddings."""
        return F.embedding(indices, self.weight)
