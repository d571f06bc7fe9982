"""The swarm against one process, side by side in one run, on SmolLM2-135M (fp32, greedy):

1. transformers, one process (the reference implementation, its KV cache, one forward per token);
2. our engine, one process (LocalModel: the same span code the workers run, no network);
3. the mesh: a bootstrap node and 3 workers (1-10, 11-20, 21-30) on loopback, our client.

Reports time to first token (TTFT) for the chat prompt, decode tokens/s, the per-hop overhead
((mesh decode step - one-process engine decode step) / 3 workers; the engine step is the sum of the
three spans' compute), and aggregate decode tokens/s with 1, 4 and 16 concurrent sessions.

    python bench/bench_mesh.py [--decode-tokens 64] [--sessions 1 4 16] [--plot docs/bench-mesh.png]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from inferencemesh.compute.generation import LocalModel
from inferencemesh.compute.prepare import prepare_model

PROMPT = "What is the capital of France?"


def time_decode(step, first_token: int, tokens: int) -> tuple[float, list[float]]:
    """Greedy decode of ``tokens`` steps; returns (tokens/s, per-step seconds)."""
    token, steps = first_token, []
    for _ in range(tokens):
        started = time.perf_counter()
        logits = step([token])
        steps.append(time.perf_counter() - started)
        token = int(logits.argmax())
    return tokens / sum(steps), steps


def bench_transformers(model_dir: Path, prompt_ids: list[int], tokens: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    state: dict[str, object] = {}

    @torch.inference_mode()
    def step(ids: list[int]) -> torch.Tensor:
        out = model(torch.tensor([ids]), past_key_values=state.get("past"), use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[0, -1]

    step(prompt_ids)  # warm-up
    state.clear()
    started = time.perf_counter()
    first = int(step(prompt_ids).argmax())
    ttft = time.perf_counter() - started
    tps, steps = time_decode(step, first, tokens)
    return {"ttft_s": ttft, "decode_tps": tps, "step_s": statistics.median(steps)}


def bench_engine(model_dir: Path, prompt_ids: list[int], tokens: int) -> dict[str, float]:
    model = LocalModel.load(model_dir, progress=False)
    warm = model.new_session(len(prompt_ids) + 4)
    warm.step(prompt_ids)
    warm.close()
    session = model.new_session(len(prompt_ids) + tokens + 1)
    started = time.perf_counter()
    first = int(session.step(prompt_ids).argmax())
    ttft = time.perf_counter() - started
    tps, steps = time_decode(session.step, first, tokens)
    session.close()
    return {"ttft_s": ttft, "decode_tps": tps, "step_s": statistics.median(steps)}


def bench_mesh(client: DistributedModelForCausalLM, prompt_ids: list[int], tokens: int) -> dict[str, float]:
    with client.inference_session(len(prompt_ids) + 4) as warm:
        warm.step(prompt_ids)
    opened = time.perf_counter()
    with client.inference_session(len(prompt_ids) + tokens + 1) as session:
        started = time.perf_counter()
        first = int(session.step(prompt_ids).argmax())
        ttft = time.perf_counter() - started
        tps, steps = time_decode(session.step, first, tokens)
    return {
        "ttft_s": ttft,
        "open_s": started - opened,
        "decode_tps": tps,
        "step_s": statistics.median(steps),
    }


def aggregate_tps(
    client: DistributedModelForCausalLM, prompt_ids: list[int], sessions: int, tokens: int
) -> float:
    """Decode tokens/s summed over ``sessions`` sessions stepping concurrently (each in its thread)."""
    opened = [client.inference_session(len(prompt_ids) + tokens + 1) for _ in range(sessions)]
    firsts = [int(s.step(prompt_ids).argmax()) for s in opened]
    barrier = threading.Barrier(sessions + 1)
    done = threading.Barrier(sessions + 1)

    def run(session, first: int) -> None:
        barrier.wait()
        time_decode(session.step, first, tokens)
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


def plot(path: Path, results: dict[str, dict[str, float]], aggregate: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(results)
    left.bar(names, [results[n]["decode_tps"] for n in names], color=["#999", "#4a7", "#37b"])
    left.set_ylabel("decode tokens/s (batch 1)")
    left.set_title("SmolLM2-135M fp32, one session")
    counts = sorted(aggregate)
    right.plot(counts, [aggregate[c] for c in counts], marker="o", color="#37b")
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
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process (default 1)")
    args = parser.parse_args()
    model_dir = prepare_model("smollm2")
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads} in this process and in each worker")

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as logs:
        swarm = LocalSwarm(Path(logs))
        swarm.start_bootstrap()
        for layers in ("1-10", "11-20", "21-30"):
            swarm.start_worker(layers, model_dir, "--stats-interval", "3600", "--threads", str(args.threads))
        try:
            swarm.wait_for_workers(3)
            client = DistributedModelForCausalLM.from_pretrained(model_dir, [swarm.bootstrap])
            prompt_ids = client.encode_prompt(PROMPT, chat=True)
            print(f"prompt: {len(prompt_ids)} tokens; decode: {args.decode_tokens} tokens")
            results["transformers"] = bench_transformers(model_dir, prompt_ids, args.decode_tokens)
            results["engine"] = bench_engine(model_dir, prompt_ids, args.decode_tokens)
            results["mesh"] = bench_mesh(client, prompt_ids, args.decode_tokens)
            aggregate = {n: aggregate_tps(client, prompt_ids, n, args.decode_tokens) for n in args.sessions}
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
    print(f"mesh session open (route + 3 sessions): {results['mesh']['open_s'] * 1e3:.1f} ms")
    overhead = (results["mesh"]["step_s"] - results["engine"]["step_s"]) / 3
    print(f"per-hop overhead: {overhead * 1e3:.3f} ms (median mesh step - median engine step, / 3 workers)")
    single = aggregate.get(1)
    for count, tps in aggregate.items():
        ratio = f" ({tps / single:.2f}x single)" if single else ""
        print(f"aggregate decode, {count:2d} sessions: {tps:8.1f} tok/s{ratio}")
    if args.plot:
        plot(args.plot, results, aggregate)


if __name__ == "__main__":
    main()
