"""What one hop costs besides compute: a worker's step path measured in one process, warm and cold.

A client endpoint sends STEPs (one token, SmolLM2 fp32) to a real WorkerService serving one block,
over QUIC on loopback, and waits for each STEP_RESULT. Overhead = round trip - the forward the worker
measured: two transfers, the worker's receive, validation, queueing and send, the client's encode and
receive. "cold" streams a buffer larger than the L3 cache between steps, as a span's forward does to
everything that runs after it in a swarm (a worker's 10 blocks stream 141 MB per token).

Two parts of that cost on their own: encoding and decoding a STEP frame, warm and cold; and a
process waking another (a pipe round trip between two processes, on one CPU and across two, back to
back and after both slept 5 ms).

    python bench/bench_hop.py [--steps 200] [--evict-mb 128] [--model-path DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import torch

from inferencemesh.compute.prepare import prepare_model
from inferencemesh.compute.span import Span
from inferencemesh.p2p.identity import Identity
from inferencemesh.protocol.frames import FrameLimits, decode_message, encode_message
from inferencemesh.protocol.messages import MessageKind
from inferencemesh.server.scheduler import ComputeScheduler
from inferencemesh.server.service import WorkerService
from inferencemesh.server.sessions import SessionRegistry
from inferencemesh.transport.endpoint import Endpoint


async def measure(span: Span, steps: int, evict: torch.Tensor | None) -> tuple[float, float]:
    """Median (round trip, worker forward) seconds of ``steps`` decode steps."""
    worker_id, client_id = Identity.generate(), Identity.generate()
    worker = await Endpoint.start(worker_id.private_seed, "127.0.0.1", 0)
    client = await Endpoint.start(client_id.private_seed, "127.0.0.1", 0)
    scheduler = ComputeScheduler(
        span, max_batch=8, prefill_chunk=256, inline_budget_s=0.05, gather_s=0.0005,
        decode_row_s=0.001, prefill_token_s=0.001,
    )  # fmt: skip
    service = WorkerService(
        span=span,
        model_id="bench",
        sessions=SessionRegistry(span.cache_manager(64 << 20), 4096),
        scheduler=scheduler,
        endpoint=worker,
        max_request_tokens=8192,
        frame_limits=FrameLimits(),
    )
    worker.set_handler(service.handle)
    results: dict[int, asyncio.Future[float]] = {}

    def on_result(peer_id: bytes, buffer: object) -> None:
        message = decode_message(buffer)
        results.pop(message.request_id).set_result(time.perf_counter())

    client.set_handler(on_result)
    address = ("127.0.0.1", worker.port)
    session_id, token = os.urandom(16), os.urandom(16)
    opened = {"model_id": "bench", "session_id": session_id, "token": token, "max_length": steps + 1}
    await client.request(worker.peer_id, address, encode_message(MessageKind.OPEN_SESSION, 1, opened))
    hidden = torch.zeros(1, span.config.hidden_size)
    round_trips, forwards = [], []
    for step in range(steps):
        if evict is not None:
            evict.add_(1.0)
        metadata = {
            "client": client.peer_id,
            "session_id": session_id,
            "token": token,
            "position": step,
            "last_only": True,
            "chain": [],
        }
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        results[step + 1] = done
        forward_s = scheduler.stats.decode_seconds
        started = time.perf_counter()
        await client.send(
            worker.peer_id, address, encode_message(MessageKind.STEP, step + 1, metadata, [hidden])
        )
        round_trips.append(await done - started)
        forwards.append(scheduler.stats.decode_seconds - forward_s)
    await client.close()
    await worker.close()
    scheduler.stop()
    return statistics.median(round_trips), statistics.median(forwards)


def codec_us(evict: torch.Tensor | None, samples: int = 200) -> float:
    """Median µs to encode a STEP frame (a worker forwarding), flatten it and decode it."""
    hidden = torch.zeros(1, 576)
    chain = [[os.urandom(32), "127.0.0.1:40001", os.urandom(16)] for _ in range(2)]
    metadata = {"client": os.urandom(32), "session_id": os.urandom(16), "token": os.urandom(16)}
    times = []
    for position in range(samples):
        if evict is not None:
            evict.add_(1.0)
        started = time.perf_counter()
        forwarded = dict(metadata, position=position, last_only=True, chain=chain[1:])
        decode_message(encode_message(MessageKind.STEP, position, forwarded, [hidden]).to_bytes())
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def pipe_round_trips_us(cpus: tuple[int, int] | None, rounds: int = 200) -> tuple[float, float]:
    """Median µs of a one-byte pipe round trip between two processes: (back to back, after 5 ms asleep)."""
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    child = os.fork()
    if child == 0:
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[1]})
        for _ in range(rounds):
            os.read(to_child, 1)
            os.write(from_child, b"x")
        os._exit(0)
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[0]})
    busy, idle = [], []
    for index in range(rounds):
        if index % 2:
            time.sleep(0.005)
        started = time.perf_counter()
        os.write(from_parent, b"x")
        os.read(to_parent, 1)
        (idle if index % 2 else busy).append(time.perf_counter() - started)
    os.waitpid(child, 0)
    for fd in (to_child, from_parent, to_parent, from_child):
        os.close(fd)
    if cpus is not None:
        os.sched_setaffinity(0, os.sched_getaffinity(0) | set(cpus))
    return statistics.median(busy) * 1e6, statistics.median(idle) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--evict-mb", type=int, default=128, help="bytes streamed between cold steps")
    parser.add_argument(
        "--model-path",
        type=Path,
        default=None,
        help="a SmolLM2-135M-shaped model directory (default: the prepared SmolLM2-135M-Instruct)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    span = Span.load(args.model_path or prepare_model("smollm2"), 0, 1, progress=False)
    evict = torch.ones(args.evict_mb << 18)
    print(f"one SmolLM2 block, fp32, {args.steps} decode steps per case, 1 torch thread")
    for label, buffer in (("warm", None), ("cold", evict), ("warm", None), ("cold", evict)):
        round_trip, forward = asyncio.run(measure(span, args.steps, buffer))
        print(
            f"{label}: round trip {round_trip * 1e6:7.1f} us, forward {forward * 1e6:6.1f} us, "
            f"overhead {(round_trip - forward) * 1e6:6.1f} us (two transfers)"
        )
    print(
        f"STEP frame encode + to_bytes + decode: warm {codec_us(None):.1f} us, cold {codec_us(evict):.1f} us"
    )
    cpus = sorted(os.sched_getaffinity(0))
    layouts = [("one CPU", (cpus[0], cpus[0]))] + (
        [("two CPUs", (cpus[0], cpus[1]))] if len(cpus) > 1 else []
    )
    for label, pinned in layouts:
        busy, idle = pipe_round_trips_us(pinned)
        print(
            f"pipe round trip between processes on {label}: back to back {busy:.0f} us, "
            f"after 5 ms asleep {idle:.0f} us"
        )


if __name__ == "__main__":
    main()
