"""A client's sessions share its latest DHT lookup (KnownProviders), and stay exact and safe doing so.

Real bootstrap and worker processes on loopback, the real model. The tests run in file order: the
first starts the worker the swarm lacks, the last kills one.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from tests.swarm.conftest import MAX_NEW_TOKENS, PROMPTS

REPLICAS = ("replica-a", "replica-b")  # both serve blocks 11-20


@pytest.fixture(scope="module")
def partial_swarm(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[LocalSwarm]:
    """Blocks 1-10 and two workers for 11-20; nobody serves 21-30 until the first test starts it."""
    swarm = LocalSwarm(tmp_path_factory.mktemp("known-providers"))
    try:
        swarm.start_bootstrap()
        swarm.start_worker("1-10", smollm2_dir)
        for name in REPLICAS:
            swarm.start_worker("11-20", smollm2_dir, name=name)
        swarm.wait_until(lambda r: sum(len(m["workers"]) for m in r["models"]) == 3, 180, "3 workers")
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def model(partial_swarm: LocalSwarm, smollm2_dir: Path) -> Iterator[DistributedModelForCausalLM]:
    model = DistributedModelForCausalLM.from_pretrained(smollm2_dir, [partial_swarm.bootstrap])
    model.known.fresh_s = 600.0  # whether a lookup is still fresh must not depend on the tests' pace
    yield model
    model.close()


def peer_id_of(swarm: LocalSwarm, name: str) -> str:
    match = re.search(r"peer id ([0-9a-f]{64})", swarm.log(name))
    assert match, swarm.log(name)
    return match.group(1)


def test_a_lookup_that_missed_blocks_is_not_reused_and_the_session_looks_up_again(
    partial_swarm: LocalSwarm,
    model: DistributedModelForCausalLM,
    smollm2_dir: Path,
    reference_tokens: dict[str, list[int]],
) -> None:
    model.runtime.call(model.known.look_up(model.runtime))  # the prefetch's, or one like it
    assert model.known.fresh() == {}  # nobody serves blocks 21-30 yet: nothing to plan over
    lookups = model.known.lookups
    partial_swarm.start_worker("21-30", smollm2_dir)
    partial_swarm.wait_for_workers(4)
    result = model.generate(PROMPTS[0], chat=True, max_new_tokens=MAX_NEW_TOKENS)
    assert result.token_ids == reference_tokens[PROMPTS[0]]
    assert model.known.lookups == lookups + 1
    assert all(model.known.fresh().values())


def test_sessions_opened_while_the_lookup_is_fresh_plan_over_it_and_stay_exact(
    model: DistributedModelForCausalLM, reference_tokens: dict[str, list[int]]
) -> None:
    lookups = model.known.lookups
    results = model.generate_batch(PROMPTS[1:], chat=True, max_new_tokens=MAX_NEW_TOKENS)
    alone = model.generate(PROMPTS[0], chat=True, max_new_tokens=MAX_NEW_TOKENS)
    assert [r.token_ids for r in results] == [reference_tokens[p] for p in PROMPTS[1:]]
    assert alone.token_ids == reference_tokens[PROMPTS[0]]
    assert model.known.lookups == lookups  # four sessions opened, no DHT lookup


def test_a_worker_that_died_since_the_lookup_is_probed_banned_and_routed_around(
    partial_swarm: LocalSwarm, model: DistributedModelForCausalLM, reference_tokens: dict[str, list[int]]
) -> None:
    used = model.generate(PROMPTS[1], chat=True, max_new_tokens=MAX_NEW_TOKENS).route[1]["peer_id"]
    (dead,) = [name for name in REPLICAS if peer_id_of(partial_swarm, name) == used]
    (alive,) = [name for name in REPLICAS if name != dead]
    partial_swarm.stop_process(dead, signal.SIGKILL)  # no withdrawal: the known entry stays as it was
    del partial_swarm.processes[dead]
    lookups = model.known.lookups
    result = model.generate(PROMPTS[1], chat=True, max_new_tokens=MAX_NEW_TOKENS)
    assert result.token_ids == reference_tokens[PROMPTS[1]]
    assert result.route[1]["peer_id"] == peer_id_of(partial_swarm, alive)
    assert bytes.fromhex(used) in model.bans.banned()
    assert result.failovers == 0 and model.known.lookups == lookups
