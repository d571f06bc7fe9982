"""A span served by two workers: both are usable, and a worker stopped with SIGTERM leaves cleanly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from tests.swarm.conftest import MAX_NEW_TOKENS, PROMPTS, start_swarm


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[LocalSwarm]:
    swarm = start_swarm(tmp_path_factory.mktemp("replicas"), smollm2_dir, ("1-10", "11-20", "11-20", "21-30"))
    yield swarm
    swarm.stop()


def middle_workers(swarm: LocalSwarm) -> list[str]:
    (model,) = swarm.status()["models"]
    return [w["peer_id"] for w in model["workers"] if w["layers"] == "11-20"]


def test_both_workers_of_a_replicated_span_serve_exactly(
    replicated: LocalSwarm, smollm2_dir: Path, reference_tokens: dict[str, list[int]]
) -> None:
    replicas = middle_workers(replicated)
    assert len(replicas) == 2
    for use, avoid in (replicas, reversed(replicas)):
        with DistributedModelForCausalLM.from_pretrained(smollm2_dir, [replicated.bootstrap]) as model:
            model.bans.ban(bytes.fromhex(avoid), "test: force the other replica")
            result = model.generate(PROMPTS[2], chat=True, max_new_tokens=MAX_NEW_TOKENS)
        assert result.token_ids == reference_tokens[PROMPTS[2]]
        assert result.route[1]["peer_id"] == use


def test_sigterm_withdraws_the_worker_and_exits_zero(replicated: LocalSwarm) -> None:
    name = next(n for n in replicated.processes if n.startswith("worker-11-20"))
    assert replicated.stop_process(name) == 0
    log = replicated.log(name)
    assert "withdrawing DHT entries" in log and "stopped" in log
    assert "withdrew 12 keys from the DHT" in log  # blocks 11-20, the model directory and index
    del replicated.processes[name]
    # The withdrawal supersedes the entry at once: no need to wait for its 60 s expiry.
    report = replicated.wait_until(
        lambda r: sum(len(m["workers"]) for m in r["models"]) == 3, 10, "the stopped worker to disappear"
    )
    assert report["complete"]
