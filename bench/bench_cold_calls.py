"""What single calls on a decode step's way cost right after a forward, when every cache is cold.

In a swarm each worker handles a step right after the previous worker's forward streamed its weights
through the shared caches, and sends its output right after its own forward: every Python and torch
call on the way runs cold, often 10-20x its warm time (docs/benchmarks.md, "Where a hop's time goes").
This times each call once warm (right after running it) and once after reading --read-mb of memory
(a 10-block span's weights), --rounds times, and prints the medians: the choices of the step's way
(a failure callback instead of a future, no split of a one-chunk step, a foreseen step or result
matched by the native endpoint instead of decoded: Endpoint.expect_frame) rest on these figures.

    python bench/bench_cold_calls.py [--rounds 40] [--read-mb 141]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from inferencemesh.protocol.frames import (
    decode_frame,
    decode_message,
    decode_metadata,
    encode_message,
)
from inferencemesh.protocol.messages import MessageKind
from inferencemesh.transport.endpoint import FrameWait, _FailureReport

HIDDEN = 576


def step_frame() -> bytes:
    """A STEP as the first worker of three receives it."""
    metadata = {
        "client": os.urandom(32),
        "session_id": os.urandom(16),
        "token": os.urandom(16),
        "position": 40,
        "last_only": True,
        "partial": False,
        "chain": [[os.urandom(32), "127.0.0.1:4003", os.urandom(16)]],
    }
    return encode_message(MessageKind.STEP, 7, metadata, [torch.randn(1, HIDDEN)]).to_bytes()


def calls() -> dict[str, Callable[[], Any]]:
    wire = step_frame()
    frame = decode_frame(wire)
    packed = frame.metadata
    into = torch.empty(1, HIDDEN)
    row = torch.randn(1, HIDDEN)
    waits = tuple(FrameWait)

    def future_and_callback() -> None:
        concurrent.futures.Future().add_done_callback(print)

    return {
        "nothing (the timer itself)": lambda: None,
        "concurrent Future + add_done_callback": future_and_callback,
        "failure callback (_FailureReport)": lambda: _FailureReport(print),
        "split() of a one-row step": lambda: row.split(128),
        "decode_message (whole STEP)": lambda: decode_message(wire),
        "decode_frame (layout only)": lambda: decode_frame(wire),
        "msgpack metadata decode": lambda: decode_metadata(packed),
        "torch.from_dlpack of the hidden state": lambda: torch.from_dlpack(frame.dlpack(0)),
        "copy_ of a 576-float row": lambda: into.copy_(row),
        "encode_message (STEP)": lambda: encode_message(MessageKind.STEP, 7, {"position": 1}, [row]),
        "FrameWait(0) (an enum's call)": lambda: FrameWait(0),
        "an enum member by index in a tuple": lambda: waits[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--read-mb", type=int, default=141, help="default: a 10-block span's weights")
    args = parser.parse_args()
    torch.set_num_threads(1)
    weights = torch.ones(args.read_mb * 1_000_000 // 4)
    cases = calls()
    warm: dict[str, list[float]] = {name: [] for name in cases}
    cold: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, call in cases.items():
            call()
            started = time.perf_counter()
            call()
            warm[name].append(time.perf_counter() - started)
            weights.sum()  # what a forward does to the caches
            started = time.perf_counter()
            call()
            cold[name].append(time.perf_counter() - started)
    print(f"medians of {args.rounds} rounds; cold: after reading {args.read_mb} MB")
    print(f"{'call':42s} {'warm us':>8s} {'cold us':>8s}")
    for name in cases:
        warm_us, cold_us = statistics.median(warm[name]) * 1e6, statistics.median(cold[name]) * 1e6
        print(f"{name:42s} {warm_us:8.1f} {cold_us:8.1f}")


if __name__ == "__main__":
    main()
