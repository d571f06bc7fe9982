"""Weights in huge pages against regular pages, side by side in one process (SmolLM2-135M, fp32).

Loads the same spans twice, once with their weights in transparent huge pages (what Span.load does
on the CPU) and once in torch's regular 4 KiB pages, and decodes one token at a time through each in
turn, so machine noise hits both alike. Also the client's LM head (49152 x 576, 113 MB).

    python bench/bench_hugepages.py [--rounds 60] [--blocks 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from inferencemesh.compute.hugepages import huge_pages_available, place_in_huge_pages
from inferencemesh.compute.linear import Projection
from inferencemesh.compute.prepare import prepare_model
from inferencemesh.compute.span import Span
from inferencemesh.compute.weights import WeightFiles


def span_step(span: Span) -> Callable[[], None]:
    cache = span.cache_manager(1 << 30).allocate("bench", 4096)
    span.prefill(torch.randn(32, span.config.hidden_size), cache)
    hidden = torch.randn(1, span.config.hidden_size)

    def step() -> None:
        span.decode(hidden, [cache])

    return step


def head_step(projection: Projection) -> Callable[[], None]:
    hidden = torch.randn(1, projection.in_features)

    def step() -> None:
        projection(hidden)

    return step


def compare(title: str, steps: dict[str, Callable[[], None]], rounds: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(t[rounds // 10 :]) for name, t in times.items()}
    print(f"\n{title}")
    for name, median in medians.items():
        print(f"  {name:14s} median {median * 1e3:7.2f} ms  best {min(times[name]) * 1e3:7.2f} ms")
    regular, huge = medians["regular pages"], medians["huge pages"]
    print(f"  huge pages take {huge / regular:.3f}x the time ({(1 - huge / regular) * 100:.1f} % less)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--blocks", type=int, default=10, help="blocks per span (a worker's share)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not huge_pages_available():
        raise SystemExit("this kernel has no transparent huge pages: nothing to compare")
    torch.set_num_threads(args.threads)
    model_dir = prepare_model("smollm2")
    print(f"torch threads: {args.threads}; span: blocks 1-{args.blocks}")

    def load(huge: bool) -> Span:
        return Span.load(model_dir, 0, args.blocks, progress=False, huge_pages=huge)

    compare(
        f"decode step of a {args.blocks}-block span",
        {"huge pages": span_step(load(True)), "regular pages": span_step(load(False))},
        args.rounds,
    )
    files = WeightFiles(model_dir)
    embedding = files.load("model.embed_tokens.weight", torch.float32, "cpu")
    files.close()
    regular, huge = Projection(embedding), Projection(embedding)
    place_in_huge_pages([huge])
    compare(
        "LM head, one row", {"huge pages": head_step(huge), "regular pages": head_step(regular)}, args.rounds
    )


if __name__ == "__main__":
    main()
