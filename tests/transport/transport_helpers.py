"""Helpers of the transport tests: keys, frames, and peers running in separate processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from inferencemesh import _core

ECHO, SLEEP, CHECKSUM, CALL_BACK = 1, 2, 3, 4  # request kinds peer_echo.py understands
PEER_SCRIPT = Path(__file__).with_name("peer_echo.py")
T = TypeVar("T")


def new_key() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes_raw()


def frame(kind: int, metadata: dict | None = None, payload: bytes = b"", request_id: int = 0) -> Any:
    tensors = [payload] if payload else []
    return _core.encode_frame(kind, request_id, msgpack.packb(metadata or {}), tensors)


def metadata_of(buffer: Any) -> dict:
    return msgpack.unpackb(_core.decode_frame(buffer).metadata)


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """Runs a test coroutine with an overall bound, so a hang fails the test instead of the session."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclass
class PeerProcess:
    process: subprocess.Popen
    port: int
    peer_id: bytes

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def start_peer(host: str = "127.0.0.1", key: bytes | None = None, port: int = 0) -> PeerProcess:
    process = subprocess.Popen(
        [sys.executable, str(PEER_SCRIPT), (key or new_key()).hex(), host, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline().split()
    if not line or line[0] != "READY":
        process.kill()
        raise RuntimeError(f"peer process failed to start: {line!r}")
    return PeerProcess(process, int(line[1]), bytes.fromhex(line[2]))


def stop_peer(peer: PeerProcess) -> None:
    if peer.process.poll() is None:
        peer.process.stdin.close()
        try:
            peer.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            peer.kill()
