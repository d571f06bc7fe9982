"""Linear layers with the weight layout and kernel that run fastest on CPU for their dtype and rows.

Batch-1 decode streams every weight once per token, so the matmul kernel's streaming speed is the
decode speed. Measured on the 2-core VM (one row, cold weights; docs/benchmarks.md):

- float32: MKL streams a column-major weight (an ``[out, in]`` view of contiguous ``[in, out]``
  storage) at ~23 GB/s against ~16 GB/s for the row-major one.
- bfloat16/float16: oneDNN streams the row-major weight 1.4x (bf16) and 10x (fp16) faster than the
  column-major one.

Both run one row on one thread. Several float32 rows (decode batches, prefill chunks) go to oneDNN
instead of MKL: torch's MKL runs AVX2 code on AMD CPUs, oneDNN picks its kernels by instruction set
and runs AVX-512 where there is one, and it reads the column-major weight as it lies. On the test
machine (AMD EPYC with AVX-512) that is 2-2.5x faster from 2 rows up (16 rows of a 3072x576
weight: 0.28 against 0.70 ms; the 42-token chat prompt through 10 blocks: see docs/compute.md),
and as accurate (both within 1e-5 of a float64 product). One row stays on MKL, which streams the
column-major weight fastest (``python bench/bench_linear.py`` measures every path). A row-major
weight makes the one row 9-11 % slower (batch-1 engine decode 33.2 against 35.2 tok/s), so float32
stays column-major. Splitting a float32 weight into halves for a two-thread ``bmm``
streamed at ~32 GB/s on an idle machine, but its parallel region stalls for milliseconds whenever
the machine is oversubscribed (several workers on few cores), so it is not used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _onednn_linear() -> Callable[..., torch.Tensor] | None:
    """torch's oneDNN linear for float32 on the CPU, or None where this torch build lacks it or it
    gives a wrong product (checked once, on a column-major weight as Projection holds it)."""
    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if linear is None or not torch.backends.mkldnn.is_available():
        return None
    # Fixed values: a check at import must not draw from torch's global random generator.
    weight = torch.linspace(-1.0, 1.0, 24 * 16).reshape(16, 24).t()  # column-major [24, 16]
    x = torch.linspace(-2.0, 2.0, 3 * 16).reshape(3, 16)
    try:
        product = linear(x, weight, None, "none", [], "")
    except RuntimeError:
        return None
    return linear if torch.allclose(product, F.linear(x, weight), rtol=1e-4, atol=1e-4) else None


_ONEDNN_LINEAR = _onednn_linear()


class Projection:
    """``y = x @ weight.T + bias`` for ``x`` ``[rows, in_features]``; ``weight`` is HF's ``[out, in]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        if weight.dtype == torch.float32:
            self.weight = weight.t().contiguous().t()
        else:
            self.weight = weight.contiguous()
        self._onednn_rows = (
            _ONEDNN_LINEAR is not None and weight.dtype == torch.float32 and weight.device.type == "cpu"
        )

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
        if self._onednn_rows and x.dim() == 2 and x.shape[0] > 1:
            return _ONEDNN_LINEAR(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``weight[indices]`` (``[len(indices), in_features]``): a tied LM head's embeddings."""
        return F.embedding(indices, self.weight)
