"""A swarm of InferenceMesh processes on this machine: a bootstrap node and workers on loopback.

Used by `demo` and by the end-to-end tests. Each process runs `python -m inferencemesh ...` in its own
session (so a Ctrl-C reaches only the parent, which then stops the children), with its output in a
log file that is shown when it dies unexpectedly.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PORT_STRIDE = 10  # a node uses PORT (DHT) and PORT+1 (QUIC); nodes are spaced this far apart


def _udp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_base_port(nodes: int) -> int:
    """A base port such that base + i*PORT_STRIDE (+1) is free for ``nodes`` nodes."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - nodes * PORT_STRIDE, PORT_STRIDE)
        if all(_udp_port_free(base + PORT_STRIDE * i + j) for i in range(nodes) for j in (0, 1)):
            return base
    raise RuntimeError("found no free UDP port range on 127.0.0.1")


class LocalSwarm:
    def __init__(self, log_dir: Path, base_port: int = 0, max_nodes: int = 16) -> None:
        self.log_dir = log_dir
        self.base_port = base_port or pick_base_port(max_nodes)
        self.processes: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self._next_slot = 1

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.base_port}"

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "inferencemesh", *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes[name] = (process, log_path)
        return process

    def start_bootstrap(self) -> None:
        self.spawn("bootstrap", "bootstrap", "--host", "127.0.0.1", "--port", str(self.base_port))

    def start_worker(self, layers: str, model_path: Path, *extra: str, name: str = "") -> str:
        """Starts a worker in the next free port slot; returns its name.

        Workers get one compute thread each: several share this machine's cores, and idle OpenMP
        threads spinning against each other's processes cost far more than they bring.
        """
        port = self.base_port + PORT_STRIDE * self._next_slot
        self._next_slot += 1
        name = name or f"worker-{layers}-{port}"
        self.spawn(
            name,
            "worker",
            "--bootstrap",
            self.bootstrap,
            "--layers",
            layers,
            "--model-path",
            str(model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "1",
            *extra,
        )
        return name

    def log(self, name: str) -> str:
        return self.processes[name][1].read_text(errors="replace")

    def check_alive(self) -> None:
        for name, (process, _) in self.processes.items():
            if process.poll() is not None:
                tail = "\n  ".join(self.log(name).splitlines()[-15:])
                raise RuntimeError(f"{name} exited with code {process.returncode}:\n  {tail}")

    def status(self) -> dict[str, Any]:
        from inferencemesh.cli.status import collect

        return asyncio.run(collect([self.bootstrap], "127.0.0.1"))

    def wait_until(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        """Polls the swarm status until ``predicate(status)`` holds; raises with ``what`` on timeout."""
        deadline = time.monotonic() + timeout
        # A poll before the bootstrap node listens would wait out the DHT's RPC timeouts.
        while "bootstrap" in self.processes and "bootstrap node ready" not in self.log("bootstrap"):
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for the bootstrap node")
            time.sleep(0.05)
        while True:
            self.check_alive()
            report = self.status()
            if predicate(report):
                return report
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.5)

    def wait_for_workers(self, count: int, timeout: float = 180.0) -> dict[str, Any]:
        """Waits until ``count`` workers are announced and every block is covered."""
        return self.wait_until(
            lambda r: r["complete"] and sum(len(m["workers"]) for m in r["models"]) >= count,
            timeout,
            f"{count} workers covering every block",
        )

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        process, _ = self.processes[name]
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        for process, _ in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, (process, _) in self.processes.items():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in {timeout:.0f} s: killing it", flush=True)
                process.kill()
                process.wait()
