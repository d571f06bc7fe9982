"""A transport peer in its own process, for tests that need one (a SIGKILL target, multi-process swarms).

Usage: python peer_echo.py <hex seed> [host] [port]. Prints "READY <port> <peer id hex>" once serving, then
serves until stdin closes. Requests are answered by kind (see tests/transport/conftest.py):
ECHO returns the frame itself, SLEEP waits metadata["seconds"] first, CHECKSUM answers with the SHA-256
of the whole frame in the metadata, CALL_BACK sends a request back to the sender over the connection
the sender opened (address None) and answers with that response's length.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

import msgpack

from inferencemesh import _core
from inferencemesh.transport import Endpoint

ECHO, SLEEP, CHECKSUM, CALL_BACK = 1, 2, 3, 4


def reply(kind: int, metadata: dict) -> _core.EncodedFrame:
    return _core.encode_frame(kind, 0, msgpack.packb(metadata), [])


async def main() -> None:
    seed = bytes.fromhex(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    endpoint = await Endpoint.start(seed, host, port)

    async def handle(peer_id: bytes, buffer: _core.Buffer) -> object:
        frame = _core.decode_frame(buffer)
        metadata = msgpack.unpackb(frame.metadata) if frame.metadata else {}
        if frame.kind == SLEEP:
            await asyncio.sleep(metadata["seconds"])
            return buffer
        if frame.kind == CHECKSUM:
            return reply(CHECKSUM, {"sha256": hashlib.sha256(memoryview(buffer)).hexdigest()})
        if frame.kind == CALL_BACK:
            answer = await endpoint.request(peer_id, None, reply(ECHO, {"from": "peer"}), timeout=5)
            return reply(CALL_BACK, {"len": len(answer)})
        return buffer

    endpoint.set_handler(handle)
    print(f"READY {endpoint.port} {endpoint.peer_id.hex()}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await endpoint.close()


if __name__ == "__main__":
    asyncio.run(main())
