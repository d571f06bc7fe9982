"""Compute engine vs transformers on SmolLM2-135M, same process, same threads, interleaved rounds.

Measures batch-1 and batch-16 greedy decode throughput, prefill time, and the decode time of one
decoder layer (from the difference between a 30-layer and a 15-layer model, which cancels the
embedding, head and per-step overheads). Each round runs both engines back to back; the median over
rounds is reported (and the best, which is the least disturbed by other load on a shared machine).

    python bench/bench_compute.py [--rounds 5] [--threads 2] [--dtype float32] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from inferencemesh.compute.dtypes import parse_dtype
from inferencemesh.compute.generation import LocalModel
from inferencemesh.compute.prepare import prepare_model
from inferencemesh.compute.span import Span

PROMPT_LENGTH = 32
PREFILL_LENGTH = 128
DECODE_TOKENS = 32
BATCH = 16


class Ours:
    name = "inferencemesh"

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
        self.model = LocalModel.load(
            model_dir, dtype=dtype, device=device, progress=False, cache_budget_bytes=1 << 31
        )
        self.model_dir, self.dtype, self.device = model_dir, dtype, device

    def decode(self, prompts: torch.Tensor, steps: int) -> float:
        sessions = [self.model.new_session(prompts.shape[1] + steps) for _ in range(prompts.shape[0])]
        logits = torch.stack(
            [session.step(row.tolist()) for session, row in zip(sessions, prompts, strict=True)]
        )
        tokens = logits.argmax(-1).tolist()
        start = time.perf_counter()
        for _ in range(steps):
            tokens = self.model.decode_batch(sessions, tokens).argmax(-1).tolist()
        elapsed = seconds_since(start, self.device)
        for session in sessions:
            session.close()
        return elapsed

    def layer_steps(self, num_layers: int, steps: int) -> float:
        """Decode time of blocks 1..num_layers alone (no embedding or head)."""
        span = Span.load(self.model_dir, 0, num_layers, dtype=self.dtype, device=self.device, progress=False)
        cache = span.cache_manager(1 << 30).allocate("bench", PROMPT_LENGTH + steps)
        span.prefill(torch.randn(PROMPT_LENGTH, span.config.hidden_size), cache)
        hidden = torch.randn(1, span.config.hidden_size)
        start = time.perf_counter()
        for _ in range(steps):
            hidden = span.decode(hidden, [cache])
        return seconds_since(start, self.device)

    def prefill(self, prompt: torch.Tensor) -> float:
        session = self.model.new_session(prompt.shape[0])
        start = time.perf_counter()
        session.step(prompt.tolist())
        elapsed = seconds_since(start, self.device)
        session.close()
        return elapsed


class Transformers:
    name = "transformers"

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model, self.device = model.to(device).eval(), device

    def layer_steps(self, num_layers: int, steps: int) -> float:
        """Decode time of the model cut to its first num_layers blocks (embedding and head included;
        the difference of two such times cancels them)."""
        layers, self.model.model.layers = self.model.model.layers, self.model.model.layers[:num_layers]
        self.model.config.num_hidden_layers = num_layers
        try:
            return self.decode(torch.randint(100, 49000, (1, PROMPT_LENGTH)), steps)
        finally:
            self.model.model.layers = layers
            self.model.config.num_hidden_layers = len(layers)

    @torch.inference_mode()
    def decode(self, prompts: torch.Tensor, steps: int) -> float:
        out = self.model(prompts.to(self.device), use_cache=True)
        cache, tokens = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(steps):
            out = self.model(tokens, cache=cache, use_cache=True)
            cache, tokens = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return seconds_since(start, self.device)

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor) -> float:
        prompt = prompt[None].to(self.device)
        start = time.perf_counter()
        self.model(prompt, use_cache=True)
        return seconds_since(start, self.device)


def seconds_since(start: float, device: torch.device) -> float:
    """Wall time since ``start`` once queued GPU work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def rounds(measure: dict[str, Callable[[], float]], count: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in measure}
    for _ in range(count):
        for name, run in measure.items():
            results[name].append(run())
    return results


def report(title: str, results: dict[str, list[float]], unit: str, convert: Callable[[float], float]) -> None:
    print(f"\n{title}")
    medians = {}
    for name, times in results.items():
        values = [convert(t) for t in times]
        medians[name] = statistics.median(values)
        best = max(values) if unit.endswith("/s") else min(values)
        print(f"  {name:14s} median {medians[name]:9.2f} {unit}  best {best:9.2f}")
    ours, theirs = medians["inferencemesh"], medians["transformers"]
    ratio = ours / theirs if unit.endswith("/s") else theirs / ours
    print(f"  speedup (median, inferencemesh vs transformers): {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    model_dir = prepare_model("smollm2", progress=lambda message: None)
    print(
        f"SmolLM2-135M-Instruct, {args.dtype} on {args.device}, {args.threads} threads, "
        f"torch {torch.__version__}, {args.rounds} interleaved rounds"
    )
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 49000, (BATCH, PROMPT_LENGTH), generator=generator)
    long_prompt = torch.randint(100, 49000, (PREFILL_LENGTH,), generator=generator)
    device = torch.device(args.device)
    engines = {
        engine.name: engine
        for engine in (Ours(model_dir, dtype, device), Transformers(model_dir, dtype, device))
    }

    for engine in engines.values():  # warm-up: first calls allocate and initialise kernels
        engine.decode(prompts[:2], 4)
    results = rounds(
        {name: lambda e=e: e.decode(prompts[:1], DECODE_TOKENS) for name, e in engines.items()}, args.rounds
    )
    report(
        f"batch 1 decode ({DECODE_TOKENS} tokens after a {PROMPT_LENGTH}-token prompt)",
        results,
        "tok/s",
        lambda t: DECODE_TOKENS / t,
    )
    results = rounds(
        {name: lambda e=e: e.decode(prompts, DECODE_TOKENS) for name, e in engines.items()},
        max(1, args.rounds // 2),
    )
    report(f"batch {BATCH} decode (aggregate)", results, "tok/s", lambda t: BATCH * DECODE_TOKENS / t)
    results = rounds({name: lambda e=e: e.prefill(long_prompt) for name, e in engines.items()}, args.rounds)
    report(f"prefill of {PREFILL_LENGTH} tokens", results, "ms", lambda t: t * 1e3)

    half = 15
    print(f"\nper-layer decode time, batch 1: (30-layer step - {half}-layer step) / {30 - half}")
    for name, engine in engines.items():
        full_steps = [engine.layer_steps(30, DECODE_TOKENS) for _ in range(args.rounds)]
        half_steps = [engine.layer_steps(half, DECODE_TOKENS) for _ in range(args.rounds)]
        difference = statistics.median(full_steps) - statistics.median(half_steps)
        print(f"  {name:14s} {difference / DECODE_TOKENS / (30 - half) * 1e3:6.3f} ms/layer")


if __name__ == "__main__":
    main()
