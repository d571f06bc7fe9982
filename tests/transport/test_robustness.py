"""Hostile and overloaded conditions: garbage at the port, a receiver that stops reading, a receiver
whose loop is busy."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import socket
import threading
from collections.abc import Iterator
from typing import Any

from transport_helpers import ECHO, frame, metadata_of, new_key, run

from inferencemesh import _core
from inferencemesh.transport import Endpoint, TransportConfig


class Relay(asyncio.DatagramProtocol):
    """Forwards datagrams between one client and a server and records what the client sent, so the
    test holds real QUIC packets (Initial, Handshake, 1-RTT) to mangle."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: tuple[str, int] | None = None
        self.recorded: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr == self.server:
            if self.client is not None:
                self.transport.sendto(data, self.client)
            return
        self.client = addr
        self.recorded.append(data)
        self.transport.sendto(data, self.server)


def mangled(packets: list[bytes], rng: random.Random, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        choice = rng.randrange(5)
        packet = rng.choice(packets)
        if choice == 0:
            out.append(rng.randbytes(rng.randrange(0, 1500)))
        elif choice == 1:
            out.append(packet[: rng.randrange(0, len(packet))])  # truncated
        elif choice == 2:
            flipped = bytearray(packet)
            for _ in range(rng.randrange(1, 8)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            out.append(bytes(flipped))
        elif choice == 3:
            out.append(packet)  # replayed verbatim
        else:
            # A long-header Initial with random connection ids and a random body.
            dcid, scid = rng.randbytes(rng.randrange(0, 21)), rng.randbytes(8)
            head = bytes([0xC0, 0, 0, 0, 1, len(dcid)]) + dcid + bytes([len(scid)]) + scid
            out.append(head + rng.randbytes(1200 - len(head)))
    return out


def test_garbage_and_mangled_packets_do_not_disturb_the_endpoint() -> None:
    async def main() -> None:
        server = await Endpoint.start(new_key(), "127.0.0.1", 0)
        server.set_handler(lambda peer_id, buf: buf)
        client = await Endpoint.start(new_key(), "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        transport, relay = await loop.create_datagram_endpoint(
            lambda: Relay(("127.0.0.1", server.port)), local_addr=("127.0.0.1", 0)
        )
        relay_address = ("127.0.0.1", transport.get_extra_info("sockname")[1])
        for i in range(20):
            payload = bytes(i * 500)
            response = await client.request(server.peer_id, relay_address, frame(ECHO, {"i": i}, payload))
            assert metadata_of(response) == {"i": i}
        assert len(relay.recorded) > 20

        rng = random.Random(1234)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            for n, datagram in enumerate(mangled(relay.recorded, rng, 3000)):
                attacker.sendto(datagram, ("127.0.0.1", server.port))
                if n % 200 == 0:
                    await asyncio.sleep(0.005)  # let the endpoint drain its socket buffer
        await asyncio.sleep(0.2)

        # The relayed connection still carries requests, and a fresh client connects normally.
        response = await client.request(server.peer_id, relay_address, frame(ECHO, {"after": 1}), timeout=10)
        assert metadata_of(response) == {"after": 1}
        fresh = await Endpoint.start(new_key(), "127.0.0.1", 0)
        response = await fresh.request(server.peer_id, ("127.0.0.1", server.port), frame(ECHO, {"fresh": 1}))
        assert metadata_of(response) == {"fresh": 1}
        stats = server.stats()
        assert stats.datagrams_discarded > 0
        # Junk Initials must not pile up as half-open connections.
        assert stats.connections <= 2 + 5
        transport.close()
        for ep in (fresh, client, server):
            await ep.close()

    run(main())


def test_slow_receiver_stalls_the_sender_instead_of_queueing() -> None:
    async def main() -> None:
        window = 256 << 10
        frame_size = 200 << 10
        receiver_config = TransportConfig(
            max_frame_size=512 << 10,
            max_pending_bytes=512 << 10,
            connection_window=window,
            stream_window=window,
        )
        receiver = await Endpoint.start(new_key(), "127.0.0.1", 0, receiver_config)
        sender = await Endpoint.start(new_key(), "127.0.0.1", 0)
        gate = asyncio.Event()
        handled = 0

        async def slow(peer_id: bytes, buffer: _core.Buffer) -> None:
            nonlocal handled
            await gate.wait()
            handled += 1

        receiver.set_handler(slow)
        address = ("127.0.0.1", receiver.port)
        sends = [
            asyncio.ensure_future(
                sender.send(receiver.peer_id, address, frame(ECHO, {"i": i}, bytes(frame_size)))
            )
            for i in range(30)
        ]
        await asyncio.sleep(1.0)
        completed = sum(s.done() for s in sends)
        # Credit covers what the handlers hold (max_pending_bytes) plus one window in flight.
        bound = (receiver_config.max_pending_bytes + window) // frame_size + 2
        assert 0 < completed <= bound
        assert receiver.peer_stats(sender.peer_id).messages_received <= bound
        gate.set()
        await asyncio.wait_for(asyncio.gather(*sends), 20)
        for _ in range(100):
            if handled == 30:
                break
            await asyncio.sleep(0.05)
        assert handled == 30
        await sender.close()
        await receiver.close()

    run(main())


@contextlib.contextmanager
def receiver_with_a_blocked_loop(
    config: TransportConfig, lend: bool
) -> Iterator[tuple[Endpoint, list[int], threading.Event]]:
    """An endpoint on its own loop in another thread, whose loop's thread is blocked (as by a forward
    computed inline, after ``set_busy(True)`` when ``lend``) until the yielded event is set or the
    block exits. Yields the endpoint, the ``i`` of the frames its handler received (it echoes
    requests back), and the event."""
    started: concurrent.futures.Future[Endpoint] = concurrent.futures.Future()
    unblock = threading.Event()
    received: list[int] = []

    def handle(peer_id: bytes, buffer: _core.Buffer) -> Any:
        received.append(metadata_of(buffer)["i"])
        return buffer

    async def main() -> None:
        receiver = await Endpoint.start(new_key(), "127.0.0.1", 0, config)
        receiver.set_handler(handle)
        started.set_result(receiver)
        if lend:
            receiver.set_busy(True)
        unblock.wait(60)
        if lend:
            receiver.set_busy(False)
        await asyncio.sleep(1.0)  # handles what waited, and answers
        await receiver.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    try:
        yield started.result(10), received, unblock
    finally:
        unblock.set()
        thread.join(30)


def test_a_receiver_busy_computing_lends_its_socket_and_transfers_to_it_keep_moving() -> None:
    """The loop's thread reads the socket, so while it is blocked no one would: the scheduler marks
    such work with ``set_busy``, and the I/O thread reads meanwhile. Here 8 MiB go to a receiver
    whose loop is blocked the whole time, through a 1 MiB flow-control window and a 256 KiB socket
    buffer: the sends can only complete if the receiver reads while blocked."""
    config = TransportConfig(connection_window=1 << 20, stream_window=1 << 20, socket_buffer_bytes=256 << 10)
    with receiver_with_a_blocked_loop(config, lend=True) as (receiver, received, _):

        async def send_all() -> None:
            sender = await Endpoint.start(new_key(), "127.0.0.1", 0)
            address = ("127.0.0.1", receiver.port)
            payload = bytes(1 << 20)
            sends = [sender.send(receiver.peer_id, address, frame(ECHO, {"i": i}, payload)) for i in range(8)]
            await asyncio.wait_for(asyncio.gather(*sends), 20)
            await sender.close()

        run(send_all())
    assert sorted(received) == list(range(8))


def test_a_receiver_whose_loop_stalls_without_lending_its_socket_stays_alive() -> None:
    """Blocked for longer than the peer's dead-peer timeout (1 s) without ``set_busy`` (a stall, not
    planned work), an endpoint still acknowledges what it receives: its I/O thread reads datagrams
    that waited 100 ms. The request is answered once the loop runs again."""
    with receiver_with_a_blocked_loop(TransportConfig(), lend=False) as (receiver, received, unblock):

        async def request_during_the_stall() -> None:
            sender = await Endpoint.start(new_key(), "127.0.0.1", 0)
            address = ("127.0.0.1", receiver.port)
            echo = frame(ECHO, {"i": 7}, bytes(64 << 10))
            request = asyncio.ensure_future(sender.request(receiver.peer_id, address, echo, timeout=30))
            await asyncio.sleep(2.0)  # twice the dead-peer timeout
            assert not request.done(), f"the request ended while the receiver was blocked: {request!r}"
            unblock.set()
            response = await asyncio.wait_for(request, 10)
            assert metadata_of(response)["i"] == 7
            await sender.close()

        run(request_during_the_stall())
    assert received == [7]
