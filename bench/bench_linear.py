"""float32 matmuls of a few rows, every way at hand: torch's linear (MKL) on a column-major and on a
row-major weight, ``(W @ x.T).T`` on a row-major weight (odd row counts padded to even; MKL packs
only the input rows and streams the weight once), torch's oneDNN linear on both layouts, our native
kernel (``_core.matvec_f32``, up to 2 rows at a time, column-major; where the CPU has AVX-512), and
linear.Projection, which picks among them.

Streams 20 weights of SmolLM2's projection shapes (~64 MB, more than the L3) once per sample, one
thread, so each matmul reads its weight from memory as in decode. Then the decode time of 10 SmolLM2
blocks at each batch size, as the engine runs it.

    python bench/bench_linear.py [--rows 1 2 3 4 6 8 16] [--samples 9]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from inferencemesh.compute import linear
from inferencemesh.compute.linear import Projection
from inferencemesh.compute.prepare import prepare_model
from inferencemesh.compute.span import Span

matvec, max_rows = linear._NATIVE_MATVEC, linear._NATIVE_MAX_ROWS  # None, 0 without AVX-512
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate+up, down


def median_ms(run: Callable[[], object], samples: int) -> float:
    times = []
    for _ in range(samples + 1):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) * 1e3


def row_major_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows = x.shape[0]
    padded = torch.cat([x, x[-1:]]) if rows % 2 else x  # MKL runs one row as a slow GEMV
    return torch.mm(weight, padded.t()).t()[:rows].contiguous()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def native_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``_core.matvec_f32`` on the rows of ``x``, as many at a time as it takes (column-major
    ``weight``)."""
    out_features, in_features = weight.shape
    y = torch.empty(x.shape[0], out_features)
    for first in range(0, x.shape[0], max_rows):
        rows = min(max_rows, x.shape[0] - first)
        matvec(
            weight.data_ptr(), in_features, out_features, x[first].data_ptr(), rows, 0, y[first].data_ptr()
        )
    return y


def kernels(rows_list: list[int], samples: int) -> None:
    weights = [torch.randn(*SHAPES[i % len(SHAPES)]) for i in range(20)]
    projections = [Projection(w) for w in weights]  # column-major float32
    column_major = [p.weight for p in projections]
    ways: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "MKL col": F.linear,
        "MKL row": F.linear,
        "(W@x.T).T row": row_major_product,
        "oneDNN col": onednn_linear,
        "oneDNN row": onednn_linear,
    }
    if matvec is not None:
        ways["native col"] = native_rows
    print("20 weights (~64 MB) streamed per sample, ms:")
    print(f"  {'rows':>4s} " + " ".join(f"{name:>14s}" for name in ways) + f" {'Projection':>11s}")
    for rows in rows_list:
        x = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}  # by in_features
        cells = []
        for name, product in ways.items():
            layout = column_major if name.endswith("col") else weights
            cells.append(
                median_ms(lambda x=x, f=product, ws=layout: [f(x[w.shape[1]], w) for w in ws], samples)
            )
        chosen = median_ms(lambda x=x: [p(x[p.in_features]) for p in projections], samples)
        print(f"  {rows:4d} " + " ".join(f"{ms:14.2f}" for ms in cells) + f" {chosen:11.2f}")


def decode_batches(rows_list: list[int], samples: int) -> None:
    span = Span.load(prepare_model("smollm2"), 0, 10, progress=False)
    manager = span.cache_manager(1 << 30)
    caches = [manager.allocate(i, 256) for i in range(max(rows_list))]
    for i, cache in enumerate(caches):
        span.prefill(torch.randn(40 + i, span.config.hidden_size), cache)
    print("decode of 10 SmolLM2 blocks (Projection), ms per batch:")
    for rows in rows_list:
        batch = caches[:rows]
        hidden = torch.randn(rows, span.config.hidden_size)

        def step(batch: list = batch, hidden: torch.Tensor = hidden) -> None:
            span.decode(hidden, batch)
            for cache in batch:
                cache.truncate(cache.length - 1)

        ms = median_ms(step, samples)
        print(f"  batch {rows:2d}: {ms:6.2f} ms, {rows / ms * 1e3:6.0f} tok/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 16])
    parser.add_argument("--samples", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kernels(args.rows, args.samples)
    decode_batches(args.rows, args.samples)


if __name__ == "__main__":
    main()
