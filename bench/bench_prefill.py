"""Prefill in chunks: what a chunk costs on one span, and what pipelining chunks buys in the swarm.

1. One span of 10 SmolLM2 blocks in this process: a prompt prefilled in one forward, then in chunks
   of decreasing size (each chunk's forward streams all the span's weights again).
2. The swarm (bootstrap + 3 workers, 1-10, 11-20, 21-30, on loopback): a long prompt's time to first
   logits with the client's ``SessionOptions.prefill_chunk`` at each size (0: one step), the sizes
   taking turns over --rounds rounds.

    python bench/bench_prefill.py [--span-tokens 37] [--swarm-tokens 512] [--rounds 3] [--threads 1]

``--swarm-tokens 0`` skips the swarm. ``--threads`` sets torch's threads here and in each worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from inferencemesh.compute.prepare import prepare_model
from inferencemesh.compute.span import Span


def span_chunks(model_dir: Path, tokens: int, rounds: int) -> None:
    span = Span.load(model_dir, 0, 10, progress=False)
    cache = span.cache_manager(1 << 28).allocate("bench", tokens)
    hidden = torch.randn(tokens, span.config.hidden_size)
    print(f"one span of 10 blocks, a {tokens}-token prompt:")
    for chunk in sorted({tokens, (tokens + 1) // 2, (tokens + 2) // 3, 10, 6, 1}, reverse=True):
        times = []
        for _ in range(rounds + 1):
            cache.truncate(0)
            started = time.perf_counter()
            for piece in hidden.split(chunk):
                span.prefill(piece, cache)
            times.append(time.perf_counter() - started)
        print(f"  chunks of {chunk:3d}: {statistics.median(times[1:]) * 1e3:7.1f} ms")


def swarm_chunks(model_dir: Path, tokens: int, rounds: int, chunks: list[int], threads: int) -> None:
    with tempfile.TemporaryDirectory() as logs:
        swarm = LocalSwarm(Path(logs))
        swarm.start_bootstrap()
        for layers in ("1-10", "11-20", "21-30"):
            swarm.start_worker(layers, model_dir, "--stats-interval", "3600", "--threads", str(threads))
        try:
            swarm.wait_for_workers(3)
            client = DistributedModelForCausalLM.from_pretrained(model_dir, [swarm.bootstrap])
            ids = (client.encode_prompt("The quick brown fox jumps over the lazy dog. ") * tokens)[:tokens]
            times: dict[int, list[float]] = {chunk: [] for chunk in chunks}
            for _ in range(rounds + 1):  # the first round warms up
                for chunk in chunks:
                    client.options = dataclasses.replace(client.options, prefill_chunk=chunk)
                    with client.inference_session(len(ids) + 1) as session:
                        started = time.perf_counter()
                        session.step(ids)
                        times[chunk].append(time.perf_counter() - started)
            client.close()
        finally:
            swarm.stop()
    print(f"swarm of 3 workers, a {tokens}-token prompt, time to the first logits:")
    for chunk, samples in times.items():
        label = "one step" if chunk == 0 else f"chunks of {chunk}"
        print(f"  {label:>14s}: {statistics.median(samples[1:]) * 1e3:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--span-tokens", type=int, default=37, help="the chat prompt's length")
    parser.add_argument("--swarm-tokens", type=int, default=512)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 128, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in each worker")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}")
    model_dir = prepare_model("smollm2")
    span_chunks(model_dir, args.span_tokens, args.rounds)
    if args.swarm_tokens:
        swarm_chunks(model_dir, args.swarm_tokens, args.rounds, args.chunks, args.threads)


if __name__ == "__main__":
    main()
