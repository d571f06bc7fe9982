"""What a worker's forward costs when it starts cold, as every forward in a swarm does.

A worker of a chain computes one decode step, then waits while the other hops and the client run
(~20 ms per step with three workers), asleep in its event loop. This measures one 10-block span's
decode step (SmolLM2-135M, fp32, one thread) in one process, in turn:

- back to back (what a one-process engine does),
- after sleeping --gap-ms (what each worker of a swarm does between its steps),
- after reading --read-mb of other memory (what the other workers' forwards do to the shared caches),
- after sleeping, then --spin-ms of matmuls on hot data (would the clock speed ramping up explain
  the sleep's cost, this removes it).

    python bench/bench_cold.py [--rounds 40] [--gap-ms 20] [--read-mb 282] [--spin-ms 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from inferencemesh.compute.prepare import prepare_model
from inferencemesh.compute.span import Span


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--read-mb", type=int, default=282, help="default: two other spans' weights")
    parser.add_argument("--spin-ms", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    span = Span.load(prepare_model("smollm2"), 0, 10, progress=False)
    cache = span.cache_manager(1 << 28).allocate("bench", 64)
    span.prefill(torch.randn(42, span.config.hidden_size), cache)
    hidden = torch.randn(1, span.config.hidden_size)
    other = torch.ones(args.read_mb << 18)  # float32: read_mb MiB
    hot = torch.randn(128, 128)

    def sleep_then_spin() -> None:
        time.sleep(args.gap_ms / 1e3)
        until = time.perf_counter() + args.spin_ms / 1e3
        while time.perf_counter() < until:
            torch.mm(hot, hot)

    def timed_step() -> float:
        started = time.perf_counter()
        span.decode(hidden, [cache])
        elapsed = time.perf_counter() - started
        cache.truncate(cache.length - 1)
        return elapsed

    before: dict[str, Callable[[], object]] = {
        "back to back": lambda: None,
        f"after {args.gap_ms:g} ms asleep": lambda: time.sleep(args.gap_ms / 1e3),
        f"after reading {args.read_mb} MB": other.sum,
        f"asleep, then {args.spin_ms:g} ms busy": sleep_then_spin,
    }
    times: dict[str, list[float]] = {name: [] for name in before}
    # Each way runs --rounds steps in a row (a way's first steps would still feel the previous way),
    # and the ways take two turns, so drift on the machine shows as a difference between the turns.
    for _ in range(2):
        for name, prepare in before.items():
            for _ in range(args.rounds):
                prepare()
                times[name].append(timed_step())
    base = statistics.median(times["back to back"])
    print(f"decode step of 10 blocks, median of {2 * args.rounds} (of each turn):")
    for name, samples in times.items():
        median = statistics.median(samples)
        turns = " / ".join(
            f"{statistics.median(half) * 1e3:.2f}"
            for half in (samples[: args.rounds], samples[args.rounds :])
        )
        print(f"  {name:28s} {median * 1e3:6.2f} ms  ({(median - base) * 1e3:+.2f} ms; turns {turns})")


if __name__ == "__main__":
    main()
