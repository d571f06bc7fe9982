"""Helpers that run real DHT nodes in separate processes on loopback (test-only)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SWARM_PROC = Path(__file__).with_name("swarm_proc.py")


class Proc:
    """A child process whose stdout lines are read in the background, so reads can time out. Its
    stderr goes to a file, for the report of a test that fails (tests/p2p/conftest.py)."""

    def __init__(self, args: list[str], name: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        self.name = name
        self._stderr = tempfile.TemporaryFile("w+")
        self.popen = subprocess.Popen(
            [sys.executable, *args], cwd=REPO_ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def stderr_tail(self, lines: int = 40) -> str:
        self._stderr.seek(0)
        return "".join(self._stderr.readlines()[-lines:])

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)

    def read_line(self, timeout: float = 30.0) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output from {self.popen.args} within {timeout} s") from None

    def read_json(self, timeout: float = 30.0) -> dict:
        while True:
            line = self.read_line(timeout)
            if line.startswith("{"):
                return json.loads(line)

    def send(self, message: dict) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(message) + "\n")
        self.popen.stdin.flush()

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, as a user's Ctrl-C or service manager would stop it; returns the exit code."""
        self.popen.terminate()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()

    def close(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            try:
                assert self.popen.stdin is not None
                self.popen.stdin.close()
                self.popen.wait(timeout)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.kill()


def start_bootstrap(*extra: str) -> tuple[Proc, str]:
    """Run the real ``bootstrap`` command on a free loopback port; returns it and its multiaddr."""
    args = ["-m", "inferencemesh", "bootstrap", "--host", "127.0.0.1", "--port", "0", *extra]
    proc = Proc(args, "bootstrap")
    while True:
        line = proc.read_line()
        if line.startswith("bootstrap node ready: "):
            return proc, line.split(": ", 1)[1].strip()


def start_swarm_proc(config: dict) -> Proc:
    name = f"swarm_proc ({config['nodes']} nodes, {len(config['workers'])} workers)"
    return Proc([str(SWARM_PROC), json.dumps(config)], name)
