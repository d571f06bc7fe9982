"""Linear layers with the weight layout that streams fastest on CPU for their dtype.

Batch-1 decode streams every weight once per token, so the matmul kernel's streaming speed is the
decode speed. Measured on the 2-core VM (one row, cold weights; docs/benchmarks.md):

- float32: MKL streams a column-major weight (an ``[out, in]`` view of contiguous ``[in, out]``
  storage) at ~23 GB/s against ~16 GB/s for the row-major one.
- bfloat16/float16: oneDNN streams the row-major weight 1.4x (bf16) and 10x (fp16) faster than the
  column-major one.

Both run one row on one thread. With 2-4 rows MKL's GEMM packs a float32 weight on every call and
takes 1.6-2x the one-row time; ``(W @ x.T).T`` on a row-major weight streams it once (2 rows cost
what 1 does, 4 rows 1.25x), but no product on the column-major weight does, and a row-major weight
makes the one row 9-11 % slower (batch-1 engine decode 33.2 against 35.2 tok/s). Batch 1 is every
lone user's decode, so float32 stays column-major (``python bench/bench_linear.py`` measures all
three). Splitting a float32 weight into halves for a two-thread ``bmm``
streamed at ~32 GB/s on an idle machine, but its parallel region stalls for milliseconds whenever
the machine is oversubscribed (several workers on few cores), so it is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Projection:
    """``y = x @ weight.T + bias`` for ``x`` ``[rows, in_features]``; ``weight`` is HF's ``[out, in]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        if weight.dtype == torch.float32:
            self.weight = weight.t().contiguous().t()
        else:
            self.weight = weight.contiguous()

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
        return F.linear(x, self.weight, self.bias)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``weight[indices]`` (``[len(indices), in_features]``): a tied LM head's embeddings."""
        return F.embedding(indices, self.weight)
