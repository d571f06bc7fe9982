"""Recovery time after a worker dies (SIGKILL) or hangs (SIGSTOP) in the middle of a generation.

    python bench/bench_failover.py [--runs 12] [--freeze-runs 4] [--compare]

Starts a bootstrap node and two workers per span (1-10, 11-20, 21-30) of SmolLM2-135M on loopback and
runs greedy 20-token generations. Run ``seed`` strikes as ``FaultPlan.draw(seed)`` says (the prefill or
a decode step, 0-50 ms in, one hop of the route); a killed worker is replaced before the next run, a
frozen one is resumed. For every run it prints the stall (fault -> result of the step that failed over:
detection plus re-routing plus the replay, what a user sees) and whether tokens and logits match an
uninterrupted run, then the median and max per kind of fault.

--compare runs every seed a second time, right after, with the failure detection settings the client
had before issue 7 (probe hops after 1 s without a step result, 0.5 s probe timeout, 1 s QUIC dead-peer
timeout), so both are measured side by side on the same swarm.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from inferencemesh.client.runtime import MeshRuntime
from inferencemesh.client.session import SessionFailed, SessionOptions
from inferencemesh.compute.prepare import prepare_model
from inferencemesh.testing.chaos import FaultPlan, FaultyRun, greedy_with_fault, max_logit_difference
from inferencemesh.testing.faulty_swarm import ChaosSwarm
from inferencemesh.transport.config import TransportConfig

PROMPT = "Write one sentence about the sea."
NEW_TOKENS = 20
SPANS = ("1-10", "1-10", "11-20", "11-20", "21-30", "21-30")


def client(model_dir: Path, bootstrap: str, before_issue_7: bool) -> DistributedModelForCausalLM:
    if not before_issue_7:
        return DistributedModelForCausalLM.from_pretrained(model_dir, [bootstrap])
    runtime = MeshRuntime([bootstrap], transport=TransportConfig(dead_peer_timeout_s=1.0))
    options = SessionOptions(step_timeout_s=1.0, probe_timeout_s=0.5)
    return DistributedModelForCausalLM(model_dir, runtime, dtype=torch.float32, options=options)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=12, help="seeded SIGKILL runs (default 12)")
    parser.add_argument("--freeze-runs", type=int, default=4, help="seeded SIGSTOP runs (default 4)")
    parser.add_argument("--compare", action="store_true", help="also run each seed with the old detection")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    model_dir = prepare_model("smollm2")
    configs = {"now": False, "before": True} if args.compare else {"now": False}
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as logs:
        swarm = LocalSwarm(Path(logs))
        chaos = ChaosSwarm(swarm, model_dir)
        swarm.start_bootstrap()
        for layers in SPANS:
            swarm.start_worker(layers, model_dir)
        try:
            swarm.wait_for_workers(len(SPANS))
            clients = {name: client(model_dir, swarm.bootstrap, old) for name, old in configs.items()}
            try:
                run_all(chaos, clients, args.runs, args.freeze_runs)
            finally:
                for model in clients.values():
                    model.close()
        finally:
            chaos.thaw_all()
            swarm.stop()
    return 0


def run_all(
    chaos: ChaosSwarm, clients: dict[str, DistributedModelForCausalLM], runs: int, freeze_runs: int
) -> None:
    first = next(iter(clients.values()))
    prompt_ids = first.encode_prompt(PROMPT, chat=True)
    reference = greedy_with_fault(first, prompt_ids, NEW_TOKENS)
    stalls: dict[tuple[str, str], list[float]] = {}
    print(f"{'fault':8} {'settings':8} {'plan':48} {'stall s':>8} {'replay s':>9}  output")
    for kind, count in (("SIGKILL", runs), ("SIGSTOP", freeze_runs)):
        for seed in range(count):
            plan = FaultPlan.draw(seed, steps=len(reference.tokens) - 1, hops=3)
            for name, model in clients.items():
                strike = chaos.kill if kind == "SIGKILL" else chaos.freeze
                try:
                    run = greedy_with_fault(model, prompt_ids, NEW_TOKENS, plan, strike)
                    stall = report(kind, name, plan, run, reference)
                except SessionFailed as exc:  # a run that never recovered is a result too
                    print(f"{kind:8} {name:8} {plan.describe():48}   FAILED: {exc}", flush=True)
                    stall = float("inf")
                finally:
                    chaos.replace_dead()
                    chaos.thaw_all()
                stalls.setdefault((kind, name), []).append(stall)
    print()
    for (kind, name), values in stalls.items():
        failed = sum(1 for v in values if v == float("inf"))
        print(
            f"{kind} ({name} settings): {len(values)} runs, {failed} failed; stall median "
            f"{statistics.median(values):.3f} s, max {max(values):.3f} s, min {min(values):.3f} s"
        )


def report(kind: str, settings: str, plan: FaultPlan, run: FaultyRun, reference: FaultyRun) -> float:
    exact = run.tokens == reference.tokens
    difference = max_logit_difference(run.logits, reference.logits)
    stall = run.stall_s if run.stall_s is not None else float("nan")
    replay = ", ".join(f"{s:.3f}" for s in run.failover_s)
    outcome = f"{'identical' if exact else 'DIFFERENT'} tokens, logits within {difference:.1e}"
    print(f"{kind:8} {settings:8} {plan.describe():48} {stall:8.3f} {replay:>9}  {outcome}", flush=True)
    return stall


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - started:.0f} s")
    sys.exit(code)
