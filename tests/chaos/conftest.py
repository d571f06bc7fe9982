"""Fault-tolerance fixtures and helpers. The swarms are real worker processes on loopback that the tests
kill, freeze and cut off (inferencemesh.testing); every recovery a test provokes is recorded and summed
up at the end of the run."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import pytest

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from inferencemesh.p2p.address import parse_host_port
from inferencemesh.protocol.messages import MessageKind
from inferencemesh.testing.chaos import FaultyRun
from tests.swarm.conftest import reference_tokens  # noqa: F401  (a fixture, shared with tests/swarm)


@dataclass
class RecoveryLog:
    """Stall (fault -> the failed-over step's result) of every provoked recovery, by test."""

    records: list[tuple[str, float, list[float]]] = field(default_factory=list)

    def add(self, label: str, run: FaultyRun) -> None:
        assert run.stall_s is not None, f"{label}: no failover followed the fault"
        self.records.append((label, run.stall_s, run.failover_s))

    def summary(self) -> str:
        stalls = [stall for _, stall, _ in self.records]
        lines = [
            f"recovery after a fault: {len(stalls)} runs, median {statistics.median(stalls):.3f} s, "
            f"max {max(stalls):.3f} s (fault -> result of the step that failed over)"
        ]
        for label, stall, replays in self.records:
            took = ", ".join(f"{r:.3f}" for r in replays)
            lines.append(f"  {label}: {stall:.3f} s (re-route + replay took {took} s)")
        return "\n".join(lines)


_LOG = RecoveryLog()


@pytest.fixture(scope="session")
def recoveries() -> RecoveryLog:
    return _LOG


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _LOG.records:
        terminalreporter.write_sep("-", "chaos recoveries")
        terminalreporter.write_line(_LOG.summary())


@dataclass(frozen=True)
class WorkerState:
    sessions: int
    free_cache_tokens: int


def worker_states(swarm: LocalSwarm, model: DistributedModelForCausalLM) -> dict[str, WorkerState]:
    """What every announced worker's PING reply says about its sessions and KV cache, by peer id."""
    states = {}
    runtime = model.runtime
    for entry in (w for m in swarm.status()["models"] for w in m["workers"]):
        peer, address = bytes.fromhex(entry["peer_id"]), parse_host_port(entry["addresses"][0])
        info = runtime.call(runtime.request(peer, address, MessageKind.PING, {}, 5.0)).metadata
        states[entry["peer_id"]] = WorkerState(info["sessions"], info["free_cache_tokens"])
    return states
