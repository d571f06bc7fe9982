"""The endpoint against peers in other processes: bulk transfer, killed peers, swarms, reconnection."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest
from transport_helpers import (
    CALL_BACK,
    CHECKSUM,
    ECHO,
    SLEEP,
    PeerProcess,
    frame,
    metadata_of,
    new_key,
    run,
    start_peer,
    stop_peer,
)

from inferencemesh.transport import ConnectionLost, Endpoint, TransportConfig


def test_64_mib_transfer_arrives_intact(peer: PeerProcess) -> None:
    async def main() -> None:
        client = await Endpoint.start(new_key(), "127.0.0.1", 0)
        payload = os.urandom(64 << 20)
        request = frame(CHECKSUM, {"n": len(payload)}, payload)
        expected = hashlib.sha256(request.to_bytes()).hexdigest()
        response = await client.request(peer.peer_id, ("127.0.0.1", peer.port), request, timeout=60)
        assert metadata_of(response) == {"sha256": expected}
        stats = client.peer_stats(peer.peer_id)
        assert stats is not None and stats.bytes_sent >= 64 << 20
        await client.close()

    run(main(), timeout=120)


def test_killed_peer_fails_the_pending_request_within_a_second(peer: PeerProcess) -> None:
    async def main() -> None:
        client = await Endpoint.start(new_key(), "127.0.0.1", 0)
        address = ("127.0.0.1", peer.port)
        assert metadata_of(await client.request(peer.peer_id, address, frame(ECHO, {"warm": 1}))) == {
            "warm": 1
        }
        pending = asyncio.ensure_future(
            client.request(peer.peer_id, address, frame(SLEEP, {"seconds": 30}), timeout=30)
        )
        await asyncio.sleep(0.7)  # the peer is alive and busy: keep-alives must keep the request going
        assert not pending.done()
        killed_at = time.monotonic()
        peer.kill()
        with pytest.raises(ConnectionLost):
            await pending
        assert time.monotonic() - killed_at <= 1.3
        assert client.peer_stats(peer.peer_id) is None  # the dead connection is gone from the pool
        await client.close()

    run(main())


def test_restarted_peer_is_reconnected() -> None:
    async def main() -> None:
        key = new_key()
        first = start_peer(key=key)
        client = await Endpoint.start(new_key(), "127.0.0.1", 0, TransportConfig(dead_peer_timeout_s=0.5))
        address = ("127.0.0.1", first.port)
        try:
            assert metadata_of(await client.request(first.peer_id, address, frame(ECHO, {"n": 1}))) == {
                "n": 1
            }
            first.kill()
            with pytest.raises(ConnectionLost):
                await client.request(first.peer_id, address, frame(ECHO, {"n": 2}), timeout=5)
            second = start_peer(key=key, port=first.port)  # same identity, same address
            try:
                response = await client.request(second.peer_id, None, frame(ECHO, {"n": 3}), timeout=5)
                assert metadata_of(response) == {"n": 3}
            finally:
                stop_peer(second)
        finally:
            first.kill()
            await client.close()

    run(main())


def test_swarm_of_processes_and_answers_over_the_callers_connection() -> None:
    async def main() -> None:
        peers = [start_peer() for _ in range(3)]
        client = await Endpoint.start(new_key(), "::", 0)
        client.set_handler(lambda peer_id, buf: buf)
        try:
            results = await asyncio.gather(
                *(
                    client.request(
                        p.peer_id, ("127.0.0.1", p.port), frame(ECHO, {"peer": i, "k": k}), timeout=20
                    )
                    for i, p in enumerate(peers)
                    for k in range(50)
                )
            )
            assert sorted((m["peer"], m["k"]) for m in map(metadata_of, results)) == sorted(
                (i, k) for i in range(3) for k in range(50)
            )
            # Each peer requests back to the client over the connection the client opened.
            answers = await asyncio.gather(
                *(client.request(p.peer_id, None, frame(CALL_BACK), timeout=20) for p in peers)
            )
            assert all(metadata_of(a)["len"] > 0 for a in answers)
            assert client.stats().connections == 3
        finally:
            for p in peers:
                stop_peer(p)
            await client.close()

    run(main())
