"""Linear layers with the weight layout and kernel that run fastest on CPU for their dtype and rows.

Batch-1 decode streams every weight once per token, so the matmul kernel's streaming speed is the
decode speed. Measured on the 2-core VM (one row, cold weights; docs/benchmarks.md):

- float32: MKL streams a column-major weight (an ``[out, in]`` view of contiguous ``[in, out]``
  storage) at ~23 GB/s against ~16 GB/s for the row-major one.
- bfloat16/float16: oneDNN streams the row-major weight 1.4x (bf16) and 10x (fp16) faster than the
  column-major one.

One or two float32 rows (batch-1 decode, the LM head of one sequence, batches of two) run on our
own kernel where the CPU has AVX-512 (``_core.matvec_f32``, csrc/matvec.cc): it streams the
column-major weight at ~40-45 GB/s against MKL's ~23-25 GB/s, 1.5-1.7x faster for one row, reads it
once for both of two rows (1.2x faster than oneDNN), and rounds less (sums in blocks of 64 inputs:
1.5e-6 against MKL's 9e-6 off a float64 product). It runs on one thread, so it is used while torch
runs at most NATIVE_MAX_THREADS threads. Elsewhere one row stays on MKL.

On Intel CPUs MKL runs its AVX-512 code: there one row stays on torch's linear (MKL), which streams
it as fast as our kernel (a Cascade Lake Xeon: 7.4-8.5 against 8.2-8.4 ms for 20 weights; another
Xeon: 6.4 against 7.0), but two rows still run on our kernel, which reads the weight once for both
(9.4-9.7 ms against MKL's 14.0), and three or more on MKL, faster there than oneDNN.

Three or more float32 rows (decode batches, prefill chunks) go to oneDNN instead of MKL: torch's MKL
runs AVX2 code on AMD CPUs, oneDNN picks its kernels by instruction set and runs AVX-512 where there
is one, and it reads the column-major weight as it lies. On the test machine (AMD EPYC with AVX-512)
that is 2-2.5x faster from 2 rows up (16 rows of a 3072x576 weight: 0.28 against 0.70 ms; the
42-token chat prompt through 10 blocks: see docs/compute.md), and as accurate (both within 1e-5 of a
float64 product). Of torch's kernels, MKL streams the column-major weight fastest for one row
(``python bench/bench_linear.py`` measures every path): a row-major weight makes it 9-11 % slower,
so float32 stays column-major. Splitting a float32 weight into halves for a two-thread ``bmm``
streamed at ~32 GB/s on an idle machine, but its parallel region stalls for milliseconds whenever
the machine is oversubscribed (several workers on few cores), so it is not used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from inferencemesh.compute.native import native_core


def _mkl_runs_avx512() -> bool:
    """Whether torch's MKL runs its AVX-512 code here: on Intel CPUs it does, and there it streams a
    float32 row as fast as our kernel and several rows faster than oneDNN (measured on a Xeon with
    AVX-512, docs/benchmarks.md), so every row stays on torch's linear. On other x86-64 CPUs MKL picks
    AVX2 code whatever the CPU supports."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            return any(
                line.split(":")[-1].strip() == "GenuineIntel" for line in cpuinfo if "vendor_id" in line
            )
    except OSError:
        return False


_MKL_RUNS_AVX512 = _mkl_runs_avx512()


def _onednn_linear() -> Callable[..., torch.Tensor] | None:
    """torch's oneDNN linear for float32 on the CPU, or None where MKL runs AVX-512, this torch build
    lacks it, or it gives a wrong product (checked once, on a column-major weight as Projection holds it)."""
    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if _MKL_RUNS_AVX512 or linear is None or not torch.backends.mkldnn.is_available():
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


def _native_matvec() -> tuple[Callable[..., None] | None, int]:
    """``_core.matvec_f32`` and the most rows it takes, or (None, 0) without the native core, on a
    CPU without AVX-512, or where it gives a wrong product (checked once, with fixed values, against
    ``F.linear``)."""
    core = native_core()
    if core is None or not core.matvec_f32_supported():
        return None, 0
    # 70 outputs, 100 inputs: full and masked vector lanes, a full and a partial block of inputs.
    weight = torch.linspace(-1.0, 1.0, 100 * 70).reshape(100, 70).t()  # column-major [70, 100]
    bias = torch.linspace(0.0, 1.0, 70)
    for rows in range(1, core.MATVEC_MAX_ROWS + 1):
        x = torch.linspace(-2.0, 2.0, rows * 100).reshape(rows, 100)
        y = torch.empty(rows, 70)
        core.matvec_f32(weight.data_ptr(), 100, 70, x.data_ptr(), rows, bias.data_ptr(), y.data_ptr())
        if not torch.allclose(y, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5):
            return None, 0
    return core.matvec_f32, core.MATVEC_MAX_ROWS


_NATIVE_MATVEC, _NATIVE_MAX_ROWS = _native_matvec()
# The row counts the native kernel runs: all it takes, but one row where MKL runs AVX-512 (as fast).
_NATIVE_ROWS = frozenset(range(2 if _MKL_RUNS_AVX512 else 1, _NATIVE_MAX_ROWS + 1))
# The kernel runs on one thread. With one or two torch threads it beats MKL on this AMD CPU (two MKL
# threads stream ~1.25x one); a process given more threads keeps torch's multi-threaded kernels, which
# can draw on more of a big machine's memory bandwidth than one core.
NATIVE_MAX_THREADS = 2


class Projection:
    """``y = x @ weight.T + bias`` for ``x`` ``[rows, in_features]``; ``weight`` is HF's ``[out, in]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        if weight.dtype == torch.float32:
            self.weight = weight.t().contiguous().t()
        else:
            self.weight = weight.contiguous()
        float32_on_cpu = weight.dtype == torch.float32 and weight.device.type == "cpu"
        self._onednn_rows = _ONEDNN_LINEAR is not None and float32_on_cpu
        # The row counts the native kernel runs: it reads the column-major float32 weight made above
        # (place_in_huge_pages keeps its strides) and a contiguous float32 bias.
        native = float32_on_cpu and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
        self._native_rows = _NATIVE_ROWS if native else frozenset()

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
        rows = x.shape[0] if x.dim() == 2 else 1
        if (
            rows in self._native_rows
            and torch.get_num_threads() <= NATIVE_MAX_THREADS
            and self._native_fits(x)
        ):
            return self._native(x, rows)
        if rows > 1 and self._onednn_rows and x.dim() == 2:
            return _ONEDNN_LINEAR(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _native_fits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is as ``_core.matvec_f32`` reads it: contiguous float32 CPU rows (``[in]`` or
        ``[rows, in]``). Checked on every call, since the kernel reads raw memory."""
        return (
            x.dtype == torch.float32
            and x.is_cpu
            and x.dim() in (1, 2)
            and x.shape[-1] == self.in_features
            and x.is_contiguous()
        )

    def _native(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        y = x.new_empty(*x.shape[:-1], self.out_features)
        bias = 0 if self.bias is None else self.bias.data_ptr()
        _NATIVE_MATVEC(  # type: ignore[misc]
            self.weight.data_ptr(),
            self.in_features,
            self.out_features,
            x.data_ptr(),
            rows,
            bias,
            y.data_ptr(),
        )
        return y

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``weight[indices]`` (``[len(indices), in_features]``): a tied LM head's embeddings."""
        return F.embedding(indices, self.weight)
