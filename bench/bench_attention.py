"""Decode attention: our native kernel against torch's ops, on SmolLM2-135M in float32 on the CPU.

Two measures, each taken both ways in turn within one process (machine noise hits both alike):

1. one block's attention for one session, as a decode step runs it: the native kernel (rope, cache
   writes, attention in one call) against torch's path (the rope, the indexed cache writes, SDPA),
   at several context lengths;
2. a whole decode step of the model's 30 blocks, with and without the kernel, after a prefill of
   each context length (medians over rounds).

    python bench/bench_attention.py [--contexts 37 200 1000] [--rounds 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_mesh import cpu_model

from inferencemesh.compute import attention
from inferencemesh.compute.prepare import prepare_model
from inferencemesh.compute.span import Span

STEPS_PER_ROUND = 15


def median_us(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def one_block(span: Span, context: int, rounds: int) -> tuple[float, float]:
    """Median microseconds of block 0's attention for one session at ``context`` positions."""
    manager = span.cache_manager(1 << 30)
    cache = manager.allocate("attention", context + 1)
    span.prefill(torch.randn(context, span.config.hidden_size), cache)
    span._rope.ensure(context + 1)  # as Span.decode does before attending
    config = span.config
    qkv = torch.randn(1, config.q_size + 2 * config.kv_size)
    native = attention.NativeDecodeAttention(config, span._rope, [cache], [context])
    via_torch = span._torch_decode_attention([cache], [context])
    results: dict[str, list[float]] = {"native": [], "torch": []}
    for _ in range(rounds):
        results["native"].append(median_us(lambda: native(0, qkv), 50))
        results["torch"].append(median_us(lambda: via_torch(0, qkv), 50))
    manager.free("attention")
    return statistics.median(results["native"]), statistics.median(results["torch"])


def decode_steps(span: Span, context: int, rounds: int) -> tuple[float, float]:
    """Median milliseconds of a 30-block decode step at ``context`` positions, with and without."""
    kernel = attention._NATIVE_DECODE_ATTENTION
    manager = span.cache_manager(1 << 30)
    hidden = torch.randn(1, span.config.hidden_size)
    results: dict[str, list[float]] = {"native": [], "torch": []}
    try:
        for round_index in range(rounds):
            for name in ("native", "torch"):
                attention._NATIVE_DECODE_ATTENTION = kernel if name == "native" else None
                session = f"{name}-{round_index}"
                cache = manager.allocate(session, context + STEPS_PER_ROUND)
                span.prefill(torch.randn(context, span.config.hidden_size), cache)
                for _ in range(STEPS_PER_ROUND):
                    start = time.perf_counter()
                    span.decode(hidden, [cache])
                    results[name].append(time.perf_counter() - start)
                manager.free(session)
    finally:
        attention._NATIVE_DECODE_ATTENTION = kernel
    return statistics.median(results["native"]) * 1e3, statistics.median(results["torch"]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[37, 200, 1000])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if attention._NATIVE_DECODE_ATTENTION is None:
        raise SystemExit("the native kernel does not run here (needs the native core and AVX-512F)")
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {args.threads} thread(s)")
    span = Span.load(prepare_model("smollm2"), 0, 30, progress=True)
    print(
        f"{'context':>8} {'block: native us':>17} {'torch us':>9} {'step: native ms':>16} {'torch ms':>9}"
        f" {'ratio':>6}"
    )
    for context in args.contexts:
        block_native, block_torch = one_block(span, context, args.rounds)
        step_native, step_torch = decode_steps(span, context, args.rounds)
        print(
            f"{context:>8} {block_native:>17.1f} {block_torch:>9.1f} {step_native:>16.2f} {step_torch:>9.2f}"
            f" {step_torch / step_native:>5.2f}x"
        )


if __name__ == "__main__":
    main()
