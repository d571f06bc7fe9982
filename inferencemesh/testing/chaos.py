"""Seeded faults in the middle of a greedy generation: the harness of tests/chaos and bench_failover.

A :class:`FaultPlan` drawn from a seed says when a fault strikes (during the prefill or during the
k-th decode step, some milliseconds after the step was sent) and which hop of the session's route it
hits; :func:`greedy_with_fault` runs the generation step by step and calls ``strike(peer_id)`` on a timer
thread at that moment. The fault itself (SIGKILL, SIGSTOP, a network cut) is the caller's. The run
records every step's logits, the failovers, and the stall: the time from the strike until the step that
failed over returned its result, i.e. detection plus recovery as the user sees it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from inferencemesh.client.model import DistributedModelForCausalLM


@dataclass(frozen=True)
class FaultPlan:
    seed: int
    step: int  # the step during which the fault strikes: 0 is the prefill, k the k-th decode step
    delay_s: float  # after the step was sent (a delay longer than the step lands between two steps)
    hop: int  # index of the route hop that is hit

    @classmethod
    def draw(cls, seed: int, *, steps: int, hops: int, max_delay_s: float = 0.05) -> FaultPlan:
        """The prefill or (as often) one of decode steps 1 .. ``steps - 1``; the same seed, the same plan."""
        chance = random.Random(seed)
        step = 0 if chance.random() < 0.5 else chance.randrange(1, steps)
        return cls(seed, step, round(chance.uniform(0.0, max_delay_s), 4), chance.randrange(hops))

    def describe(self) -> str:
        where = "prefill" if self.step == 0 else f"decode step {self.step}"
        return f"seed {self.seed}: hop {self.hop} hit {self.delay_s * 1000:.0f} ms into the {where}"


@dataclass
class FaultyRun:
    plan: FaultPlan | None
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # float32 [vocab] per step
    failovers: int = 0
    failover_s: list[float] = field(default_factory=list)  # as the session measured each recovery
    victim: bytes | None = None
    stall_s: float | None = None  # strike -> result of the step that failed over
    route: list[dict[str, Any]] = field(default_factory=list)  # the hops at the end of the run


def greedy_with_fault(
    model: DistributedModelForCausalLM,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    plan: FaultPlan | None = None,
    strike: Callable[[bytes], None] | None = None,
    after_step: Callable[[FaultyRun], None] | None = None,
) -> FaultyRun:
    """Greedy generation (stops at end-of-sequence) with ``strike`` called as ``plan`` says, and
    ``after_step`` (e.g. ending the fault) after every step."""
    eos = set(model.tokenizer.eos_token_ids)
    run = FaultyRun(plan)
    struck_at: list[float] = []
    with model.inference_session(len(prompt_ids) + max_new_tokens) as session:

        def hit() -> None:
            assert plan is not None and strike is not None
            run.victim = bytes.fromhex(session.route[plan.hop]["peer_id"])
            struck_at.append(time.perf_counter())
            strike(run.victim)

        timer = threading.Timer(plan.delay_s, hit) if plan is not None and strike is not None else None
        feed = list(prompt_ids)
        for step in range(max_new_tokens):
            if timer is not None and step == plan.step:
                timer.start()
            elif timer is not None and step == plan.step + 1:
                timer.join()  # a strike that missed its step lands before the next one, not later
            before = session.failovers
            run.logits.append(session.step(feed))
            run.failovers = session.failovers
            if run.failovers > before and run.stall_s is None and struck_at:
                run.stall_s = time.perf_counter() - struck_at[0]
            if after_step is not None:
                after_step(run)
            token = int(run.logits[-1].argmax())
            if token in eos:
                break
            run.tokens.append(token)
            feed = [token]
        if timer is not None:
            timer.join()
        run.failover_s = session.failover_times
        run.route = session.route
    return run


def max_logit_difference(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference between two runs' per-step logits (inf if the step counts differ)."""
    if len(a) != len(b):
        return float("inf")
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
