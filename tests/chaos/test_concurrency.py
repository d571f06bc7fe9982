"""32 sessions at once, of mixed prompt and generation lengths, through one chain of three workers."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from tests.chaos.conftest import WorkerState, worker_states
from tests.swarm.conftest import MAX_NEW_TOKENS, PROMPTS, THREE_SPANS, start_swarm

SESSIONS = 32
DEADLINE_S = 600  # far beyond the ~1 min this takes: reaching it means a deadlock


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[LocalSwarm]:
    swarm = start_swarm(tmp_path_factory.mktemp("concurrency"), smollm2_dir, THREE_SPANS)
    yield swarm
    swarm.stop()


def test_32_concurrent_sessions_are_exact_and_leave_every_cache_empty(
    swarm: LocalSwarm, smollm2_dir: Path, reference_tokens: dict[str, list[int]]
) -> None:
    # Prompts of 4 lengths x 8 generation lengths: prefills and decodes of every size meet in batches.
    jobs = [(PROMPTS[i % len(PROMPTS)], 3 + (i * 5) % (MAX_NEW_TOKENS - 2)) for i in range(SESSIONS)]
    with DistributedModelForCausalLM.from_pretrained(smollm2_dir, [swarm.bootstrap]) as model:
        idle = worker_states(swarm, model)
        assert len(idle) == len(THREE_SPANS) and all(s.sessions == 0 for s in idle.values())
        with ThreadPoolExecutor(SESSIONS) as pool:
            futures = [pool.submit(model.generate, p, chat=True, max_new_tokens=n) for p, n in jobs]
            results = [future.result(timeout=DEADLINE_S) for future in futures]
        after = worker_states(swarm, model)
    for (prompt, new_tokens), result in zip(jobs, results, strict=True):
        assert result.token_ids == reference_tokens[prompt][:new_tokens], (prompt, new_tokens)
    assert after == {peer: WorkerState(0, state.free_cache_tokens) for peer, state in idle.items()}
