"""Process faults in a LocalSwarm: workers killed (SIGKILL), frozen (SIGSTOP) and replaced, by peer id.

The client names the workers of its route by peer id; a worker logs its peer id when it starts, which
is how a peer id is mapped back to the process to hit.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.p2p.address import parse_host_port

PEER_ID_MARK = "(peer id "


class ChaosSwarm:
    """A LocalSwarm whose workers are hit by peer id; killed workers are replaced by fresh ones."""

    def __init__(self, swarm: LocalSwarm, model_dir: Path) -> None:
        self.swarm = swarm
        self.model_dir = model_dir
        self.dead: list[str] = []
        self.frozen: set[str] = set()

    def peer_of(self, name: str) -> bytes | None:
        """The peer id a worker logged at start-up (None until it has)."""
        for line in self.swarm.log(name).splitlines():
            if PEER_ID_MARK in line:
                return bytes.fromhex(line.split(PEER_ID_MARK, 1)[1].rstrip(")"))
        return None

    def peer(self, name: str) -> bytes:
        peer = self.peer_of(name)
        assert peer is not None, f"{name} has not logged its peer id yet"
        return peer

    def address(self, name: str) -> tuple[str, int]:
        """Where the worker is announced (its QUIC address, or the proxy in front of it)."""
        peer = self.peer(name).hex()
        report = self.swarm.status()
        return parse_host_port(
            next(w for m in report["models"] for w in m["workers"] if w["peer_id"] == peer)["addresses"][0]
        )

    def name_of(self, peer_id: bytes) -> str:
        for name in self.swarm.processes:
            if name.startswith("worker-") and self.peer_of(name) == peer_id:
                return name
        raise KeyError(f"no worker of this swarm has peer id {peer_id.hex()[:12]}")

    def workers(self, layers: str) -> list[str]:
        return [n for n in self.swarm.processes if n.startswith(f"worker-{layers}-") and n not in self.dead]

    def kill(self, peer_id: bytes) -> None:
        self.kill_name(self.name_of(peer_id))

    def kill_name(self, name: str) -> None:
        self.swarm.stop_process(name, signal.SIGKILL)
        self.dead.append(name)

    def freeze(self, peer_id: bytes) -> None:
        name = self.name_of(peer_id)
        os.kill(self.swarm.processes[name][0].pid, signal.SIGSTOP)
        self.frozen.add(name)

    def thaw_all(self) -> None:
        for name in self.frozen:
            os.kill(self.swarm.processes[name][0].pid, signal.SIGCONT)
        self.frozen.clear()

    def replace_dead(self) -> None:
        """Starts a worker for the span of every killed one and waits until all are announced."""
        fresh = []
        for name in self.dead:
            layers = "-".join(name.split("-")[1:3])  # LocalSwarm names workers worker-<layers>-<port>
            del self.swarm.processes[name]
            fresh.append(self.swarm.start_worker(layers, self.model_dir))
        self.dead.clear()

        def announced(report: dict[str, Any]) -> bool:
            listed = {w["peer_id"] for m in report["models"] for w in m["workers"]}
            return all((peer := self.peer_of(n)) is not None and peer.hex() in listed for n in fresh)

        self.swarm.wait_until(announced, 120, "the replacement workers to be announced")


def wait_for_log(swarm: LocalSwarm, name: str, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in swarm.log(name):
        swarm.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not log {text!r} within {timeout:.0f} s")
        time.sleep(0.1)
