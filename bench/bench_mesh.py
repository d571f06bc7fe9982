"""The swarm against one process, side by side in one run, on SmolLM2-135M (fp32, greedy):

1. transformers, one process (the reference implementation, its KV cache, one forward per token);
2. our engine, one process (LocalModel: the same span code the workers run, no network);
3. the mesh: a bootstrap node and 3 workers (1-10, 11-20, 21-30) on loopback, our client.

The three decode one token each in turn (transformers, engine, mesh, transformers, ...), so machine
noise hits them alike; TTFT is the median of --ttft-runs prefills, also taken in turn, each from
opening a session (for the mesh: planning its route and opening it on every worker) to the first
token.

Reports time to first token (TTFT) for the chat prompt, decode tokens/s, the per-hop overhead two
ways: (mesh decode step - one-process engine decode step) / 3 workers, and, step by step, (the step's
time in the swarm - the three workers' forwards of that very step) / 3 (workers report each decode
step's forward time when a PING asks for ``step_times``), the latter both for the steps side by
side and for one session decoding on its own, back to back as ``generate`` does (a lone session's
next step and result are busy-polled for when their pace is steady), and
aggregate decode tokens/s with 1, 4 and 16 concurrent sessions, stepped two ways: by one client's
``generate_batch`` (each round sends every session's step at once) and by one thread per session
(independent users of one client).

    python bench/bench_mesh.py [--decode-tokens 64] [--sessions 1 4 16] [--plot docs/bench-mesh.png]
        [--device cpu|cuda] [--model-path DIR] [--busy-poll-us 1000]
    # DIR: a SmolLM2-135M-shaped model (tools/random_smollm2.py)
    python bench/bench_mesh.py --alone-rounds 2 --decode-tokens 80
    # only the per-hop overhead of one session decoding on its own, that many rounds (A/B runs)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from inferencemesh.compute.generation import LocalModel
from inferencemesh.compute.prepare import prepare_model

PROMPT = "What is the capital of France?"


class Session(Protocol):
    def step(self, token_ids: list[int]) -> torch.Tensor: ...  # -> logits of the next token
    def close(self) -> None: ...


class TransformersSession:
    """The reference implementation, one process, with its KV cache."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self._past: Any = None

    @torch.inference_mode()
    def step(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([token_ids], device=self._model.device)
        out = self._model(ids, past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        return out.logits[0, -1]

    def close(self) -> None:
        self._past = None


def side_by_side(
    factories: dict[str, Callable[[], Session]], prompt_ids: list[int], tokens: int, ttft_runs: int
) -> dict[str, dict[str, float]]:
    """TTFT and greedy decode of every system, taking turns step by step."""
    ttft: dict[str, list[float]] = {name: [] for name in factories}
    for _ in range(ttft_runs + 1):  # the first round warms up
        for name, factory in factories.items():
            started = time.perf_counter()
            session = factory()
            int(session.step(prompt_ids).argmax())  # the token, as in decode: waits for a GPU
            ttft[name].append(time.perf_counter() - started)
            session.close()
    sessions = {name: factory() for name, factory in factories.items()}
    next_token = {name: int(session.step(prompt_ids).argmax()) for name, session in sessions.items()}
    steps: dict[str, list[float]] = {name: [] for name in factories}
    for _ in range(tokens):
        for name, session in sessions.items():
            started = time.perf_counter()
            logits = session.step([next_token[name]])
            steps[name].append(time.perf_counter() - started)
            next_token[name] = int(logits.argmax())
    for session in sessions.values():
        session.close()
    return {
        name: {
            "ttft_s": statistics.median(ttft[name][1:]),
            "decode_tps": tokens / sum(steps[name]),
            "step_s": statistics.median(steps[name]),
        }
        for name in factories
    }


class TimedMeshSession:
    """A mesh session that keeps each decode step's id and time in the swarm (sent -> result)."""

    def __init__(self, session: Any, chains: dict[int, float]) -> None:
        self._session = session
        self._chains = chains

    def step(self, token_ids: list[int]) -> torch.Tensor:
        logits = self._session.step(token_ids)
        if len(token_ids) == 1:
            self._chains[self._session.last_step_id] = self._session.last_chain_s
        return logits

    def close(self) -> None:
        self._session.close()


def workers_step_times(client: DistributedModelForCausalLM, swarm: LocalSwarm) -> list[dict[int, float]]:
    """Each worker's forward time of its latest decode steps, by step id (PING with step_times)."""
    from inferencemesh.cli.status import collect
    from inferencemesh.p2p.address import parse_host_port
    from inferencemesh.protocol.messages import MessageKind

    async def ping_all() -> list[dict[int, float]]:
        report = await collect([swarm.bootstrap], "127.0.0.1")
        times = []
        for worker in report["models"][0]["workers"]:
            address = parse_host_port(worker["addresses"][0])
            pong = await client.runtime.request(
                bytes.fromhex(worker["peer_id"]), address, MessageKind.PING, {"step_times": True}, 5.0
            )
            times.append({step_id: seconds for step_id, seconds in pong.metadata["step_times"]})
        return times

    return client.runtime.call(ping_all())


def per_hop_overheads(chains: dict[int, float], forwards: list[dict[int, float]]) -> list[float]:
    """(a step's time in the swarm - every worker's forward of it) / hops, for each step all reported."""
    return sorted(
        (chain - sum(worker[step_id] for worker in forwards)) / len(forwards)
        for step_id, chain in chains.items()
        if all(step_id in worker for worker in forwards)
    )


def hops_generating_alone(
    client: DistributedModelForCausalLM, swarm: LocalSwarm, prompt_ids: list[int], tokens: int
) -> list[float]:
    """Per-hop overheads, step by step, of one session decoding back to back as generate() does
    (side_by_side puts a transformers and an engine step between two mesh steps)."""
    chains: dict[int, float] = {}
    session = TimedMeshSession(client.inference_session(len(prompt_ids) + tokens + 1), chains)
    token = int(session.step(prompt_ids).argmax())
    for _ in range(tokens):
        token = int(session.step([token]).argmax())
    session.close()
    return per_hop_overheads(chains, workers_step_times(client, swarm))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo): the targets' figures differ from one host to another."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} CPUs"


def print_hops(hops: list[float], how: str) -> None:
    quartiles = statistics.quantiles(hops, n=4)
    print(
        f"per-hop overhead: {quartiles[1] * 1e3:.3f} ms (each step's time in the swarm - the workers' "
        f"forwards of it, / 3 workers; {how}; median of {len(hops)} steps, middle half "
        f"{quartiles[0] * 1e3:.3f}-{quartiles[2] * 1e3:.3f} ms)"
    )


def batch_tps(
    client: DistributedModelForCausalLM,
    prompt_ids: list[int],
    sessions: int,
    tokens: int,
    waves: int | None,
) -> float:
    """Aggregate decode tokens/s of ``sessions`` sequences generated together by generate_batch."""
    results = client.generate_batch(
        [prompt_ids] * sessions, max_new_tokens=tokens + 1, ignore_eos=True, waves=waves
    )
    return sum(result.decode_tokens_per_s for result in results)


def threads_tps(
    client: DistributedModelForCausalLM, prompt_ids: list[int], sessions: int, tokens: int
) -> float:
    """Decode tokens/s summed over ``sessions`` sessions stepping concurrently (each in its thread)."""
    opened = [client.inference_session(len(prompt_ids) + tokens + 1) for _ in range(sessions)]
    firsts = [int(s.step(prompt_ids).argmax()) for s in opened]
    barrier = threading.Barrier(sessions + 1)
    done = threading.Barrier(sessions + 1)

    def run(session, first: int) -> None:
        barrier.wait()
        token = first
        for _ in range(tokens):
            token = int(session.step([token]).argmax())
        done.wait()

    threads = [threading.Thread(target=run, args=(s, f)) for s, f in zip(opened, firsts, strict=True)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    done.wait()
    elapsed = time.perf_counter() - started
    for thread in threads:
        thread.join()
    for session in opened:
        session.close()
    return sessions * tokens / elapsed


def plot(path: Path, results: dict[str, dict[str, float]], aggregates: dict[str, dict[int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(results)
    left.bar(names, [results[n]["decode_tps"] for n in names], color=["#999", "#4a7", "#37b"])
    left.set_ylabel("decode tokens/s (batch 1)")
    left.set_title("SmolLM2-135M fp32, one session")
    for (label, aggregate), color in zip(
        aggregates.items(), ("#37b", "#4a7", "#b73", "#a3b", "#777"), strict=False
    ):
        counts = sorted(aggregate)
        right.plot(counts, [aggregate[c] for c in counts], marker="o", color=color, label=label)
    right.legend()
    right.set_xscale("log", base=2)
    right.set_xticks(counts, [str(c) for c in counts])
    right.set_xlabel("concurrent sessions")
    right.set_ylabel("aggregate decode tokens/s")
    right.set_title("mesh, 3 workers on loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--ttft-runs", type=int, default=5, help="prefills per system for the TTFT median")
    parser.add_argument(
        "--waves",
        type=int,
        nargs="+",
        default=[0],
        help="generate_batch's waves, each measured (0: its default)",
    )
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process (default 1)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device of every system: transformers, the engine, the workers and the client's head",
    )
    parser.add_argument(
        "--model-path",
        type=Path,
        default=None,
        help="a SmolLM2-135M-shaped model directory (default: the prepared SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--alone-rounds",
        type=int,
        default=0,
        help="measure only the per-hop overhead of one session decoding on its own, this many times",
    )
    parser.add_argument(
        "--busy-poll-us",
        type=float,
        default=1000.0,
        help="the workers' busy_poll_us and the client's busy_poll_s, in us (0: never busy-poll)",
    )
    args = parser.parse_args()
    model_dir = args.model_path or prepare_model("smollm2")
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}; torch threads: {args.threads} in this process and in each worker")
    print(f"device: {args.device}")

    with tempfile.TemporaryDirectory() as logs:
        swarm = LocalSwarm(Path(logs))
        swarm.start_bootstrap()
        for layers in ("1-10", "11-20", "21-30"):
            swarm.start_worker(
                layers,
                model_dir,
                *("--stats-interval", "3600", "--threads", str(args.threads), "--device", args.device),
                *("--busy-poll-us", str(args.busy_poll_us)),
            )
        try:
            swarm.wait_for_workers(3)
            client = DistributedModelForCausalLM.from_pretrained(
                model_dir, [swarm.bootstrap], device=args.device, busy_poll_s=args.busy_poll_us * 1e-6
            )
            prompt_ids = client.encode_prompt(PROMPT, chat=True)
            print(f"prompt: {len(prompt_ids)} tokens; decode: {args.decode_tokens} tokens")
            if args.alone_rounds:
                for _ in range(args.alone_rounds):
                    hops = hops_generating_alone(client, swarm, prompt_ids, args.decode_tokens)
                    print_hops(hops, "one session decoding on its own")
                client.close()
                return
            from transformers import AutoModelForCausalLM

            reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            reference = reference.to(args.device).eval()
            engine = LocalModel.load(model_dir, device=args.device, progress=False)
            length = len(prompt_ids) + args.decode_tokens + 1
            chains: dict[int, float] = {}
            factories: dict[str, Callable[[], Session]] = {
                "transformers": lambda: TransformersSession(reference),
                "engine": lambda: engine.new_session(length),
                "mesh": lambda: TimedMeshSession(client.inference_session(length), chains),
            }
            results = side_by_side(factories, prompt_ids, args.decode_tokens, args.ttft_runs)
            hops = per_hop_overheads(chains, workers_step_times(client, swarm))
            hops_alone = hops_generating_alone(client, swarm, prompt_ids, args.decode_tokens)
            batched = {
                waves: {
                    n: batch_tps(client, prompt_ids, n, args.decode_tokens, waves or None)
                    for n in args.sessions
                }
                for waves in args.waves
            }
            threaded = {n: threads_tps(client, prompt_ids, n, args.decode_tokens) for n in args.sessions}
            client.close()
        finally:
            swarm.stop()

    base = results["transformers"]["decode_tps"]
    print(f"\n{'':14s} {'TTFT ms':>9s} {'decode tok/s':>13s} {'step ms':>8s} {'vs transformers':>16s}")
    for name, r in results.items():
        print(
            f"{name:14s} {r['ttft_s'] * 1e3:9.1f} {r['decode_tps']:13.1f} {r['step_s'] * 1e3:8.2f} "
            f"{r['decode_tps'] / base:15.2f}x"
        )
    overhead = (results["mesh"]["step_s"] - results["engine"]["step_s"]) / 3
    print(f"per-hop overhead: {overhead * 1e3:.3f} ms (median mesh step - median engine step, / 3 workers)")
    print_hops(hops, "the steps above, side by side")
    print_hops(hops_alone, "one session decoding on its own")
    aggregates = {f"generate_batch, waves={w or 'default'}": batched[w] for w in args.waves}
    aggregates["thread per session"] = threaded
    for label, aggregate in aggregates.items():
        single = aggregate.get(1)
        for count, tps in aggregate.items():
            ratio = f" ({tps / single:.2f}x single)" if single else ""
            print(f"aggregate decode, {count:2d} sessions, {label}: {tps:8.1f} tok/s{ratio}")
    if args.plot:
        plot(args.plot, results, aggregates)


if __name__ == "__main__":
    main()
