"""MeshProtocol and DHTNode failure handling, on real UDP sockets on loopback in one process.

Each test pins down a way kademlia 2.2.3 as shipped misbehaves (see docs/p2p.md).
"""

import asyncio
import os
import socket
import time

import msgpack
import pytest
from kademlia.node import Node
from p2p_forge import signed

from inferencemesh.p2p.announcer import Announcer
from inferencemesh.p2p.identity import Identity
from inferencemesh.p2p.lookup import find_block_providers
from inferencemesh.p2p.node import DHTConfig, DHTNode
from inferencemesh.p2p.records import block_key, dht_key

FAST = DHTConfig(rpc_timeout=0.2, rpc_retries=1, backoff_base=30.0)


class DropFirstRequests(asyncio.DatagramProtocol):
    """A UDP relay in front of a real node that loses the first ``drops`` requests sent through it."""

    def __init__(self, target: tuple[str, int], drops: int) -> None:
        self.target, self.drops, self.requests = target, drops, 0
        self.client: tuple[str, int] | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr == self.target:
            self.transport.sendto(data, self.client)
            return
        self.client = addr
        self.requests += 1
        if self.requests > self.drops:
            self.transport.sendto(data, self.target)


async def relay(target: DHTNode, drops: int) -> tuple[DropFirstRequests, int]:
    loop = asyncio.get_running_loop()
    transport, proxy = await loop.create_datagram_endpoint(
        lambda: DropFirstRequests(("127.0.0.1", target.port), drops), local_addr=("127.0.0.1", 0)
    )
    return proxy, transport.get_extra_info("sockname")[1]


def contact(node: DHTNode, port: int) -> Node:
    return Node(node.identity.dht_id, "127.0.0.1", port)


def test_one_lost_reply_is_retried_and_does_not_evict_the_contact():
    async def main():
        server = await DHTNode.start(config=FAST)
        client = await DHTNode.start(client_mode=True, config=FAST)
        proxy, port = await relay(server, drops=1)
        via_proxy = contact(server, port)
        client.protocol.router.add_contact(via_proxy)
        ok, _ = await client.protocol.call_ping(via_proxy)
        contacts = client.contacts()
        await client.close()
        await server.close()
        return ok, proxy.requests, contacts, port

    ok, requests, contacts, port = asyncio.run(main())
    assert ok and requests == 2
    assert ("127.0.0.1", port) in contacts


def test_dead_contact_fails_fast_then_is_backed_off_without_new_requests():
    async def main():
        dead = await DHTNode.start(config=FAST)
        await dead.close()
        client = await DHTNode.start(client_mode=True, config=FAST)
        gone = contact(dead, dead.port)
        client.protocol.router.add_contact(gone)
        started = time.monotonic()
        first = await client.protocol.call_find_node(gone, gone)
        first_s = time.monotonic() - started
        sent = client.protocol.requests_sent
        started = time.monotonic()
        second = await client.protocol.call_find_node(gone, gone)
        second_s = time.monotonic() - started
        await client.close()
        return first[0], second[0], first_s, second_s, sent, client.protocol.requests_sent, client.contacts()

    first_ok, second_ok, first_s, second_s, sent, sent_after, contacts = asyncio.run(main())
    assert not first_ok and not second_ok
    assert sent == 2  # one try and one retry...
    assert first_s < 2.0  # ...with a short timeout each (stock: a fixed 5 s)
    assert sent_after == sent and second_s < 0.05  # backed off: not asked again
    assert contacts == []


def test_calls_that_fail_together_back_a_contact_off_once():
    config = DHTConfig(rpc_timeout=0.1, rpc_retries=0, backoff_base=0.3)

    async def main():
        dead = await DHTNode.start(config=config)
        await dead.close()
        client = await DHTNode.start(client_mode=True, config=config)
        gone = contact(dead, dead.port)
        burst = await asyncio.gather(*(client.protocol.call_find_node(gone, gone) for _ in range(8)))
        await asyncio.sleep(0.35)  # one back-off period (8 doublings would be 77 s)
        sent = client.protocol.requests_sent
        await client.protocol.call_find_node(gone, gone)
        asked_again = client.protocol.requests_sent - sent
        await client.close()
        return burst, asked_again

    burst, asked_again = asyncio.run(main())
    assert not any(ok for ok, _ in burst)
    assert asked_again == 1


def test_malformed_and_oversized_datagrams_do_not_disturb_a_node():
    errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
        server = await DHTNode.start(config=FAST)
        msg_id = os.urandom(20)
        junk = [
            b"\x00" + msg_id + b"\xc1",  # not msgpack
            b"\x00" + msg_id + msgpack.packb(["store", [1, 2]]),  # wrong arguments
            b"\x00" + msg_id + msgpack.packb(["find_value", [os.urandom(20), "not a key"]]),
            b"\x00" + msg_id + msgpack.packb(["store", [os.urandom(20), os.urandom(20), b"x" * 9000]]),
            b"\x01" + msg_id + msgpack.packb(True),  # a reply nobody asked for
            b"\x07" * 40,
            b"\x00",
        ]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for datagram in junk:
                sock.sendto(datagram, ("127.0.0.1", server.port))
        await asyncio.sleep(0.2)
        client = await DHTNode.start(bootstrap=[server.address], client_mode=True, config=FAST)
        joined = client.contacts()
        await client.close()
        await server.close()
        return joined, server.port

    joined, port = asyncio.run(main())
    assert joined == [("127.0.0.1", port)]
    assert errors == []


def test_client_nodes_are_never_added_to_routing_tables_and_store_nothing():
    async def main():
        server = await DHTNode.start(config=FAST)
        peer = await DHTNode.start(bootstrap=[server.address], config=FAST)
        client = await DHTNode.start(bootstrap=[server.address], client_mode=True, config=FAST)
        await find_block_providers(client, "m", 4)
        seen_after_lookups = server.contacts()
        key = dht_key(block_key("m", 0))
        ok, _ = await server.protocol.call_store(contact(client, client.port), key, signed(worker, model="m"))
        result = seen_after_lookups, server.contacts(), ok, client.storage.get(key)
        for node in (client, peer, server):
            await node.close()
        return (peer.port, client.port), result

    worker = Identity.generate()
    (peer_port, client_port), (seen_after_lookups, seen_at_end, answered, held) = asyncio.run(main())
    assert ("127.0.0.1", peer_port) in seen_after_lookups
    assert ("127.0.0.1", client_port) not in seen_after_lookups
    assert not answered and held is None
    assert ("127.0.0.1", client_port) not in seen_at_end


def test_no_exception_when_no_node_answers():
    async def main():
        dead = await DHTNode.start(config=FAST)
        await dead.close()
        client = await DHTNode.start(bootstrap=[dead.address], client_mode=True, config=FAST)
        providers = await find_block_providers(client, "m", 30)
        # A server whose only contact died: stock kademlia's set_digest crashed here (max of nothing).
        lonely = await DHTNode.start(config=FAST)
        lonely.protocol.router.add_contact(contact(dead, dead.port))
        announcer = Announcer(lonely, lonely.identity, model_id="m", total_blocks=30, span_start=0,
                              span_end=30, addresses=["127.0.0.1:1"], dtype="float32", ttl=30)
        report = await announcer.publish()
        await client.close()
        await lonely.close()
        return providers, report

    providers, report = asyncio.run(main())
    assert providers == {block: [] for block in range(30)}
    assert report.failed_keys == []  # it keeps its own entries: a one-node swarm still works
    assert set(report.accepted.values()) == {1}


@pytest.mark.parametrize("pin_ok", [True, False])
def test_bootstrap_peer_id_in_the_multiaddr_is_checked(pin_ok):
    async def main():
        server = await DHTNode.start(config=FAST)
        pinned = server.multiaddr if pin_ok else server.multiaddr[:-64] + Identity.generate().peer_id_hex
        client = await DHTNode.start(bootstrap=[pinned], client_mode=True, config=FAST)
        joined = await client.join()
        await client.close()
        await server.close()
        return joined

    assert asyncio.run(main()) == (1 if pin_ok else 0)


def test_a_newcomer_among_the_closest_nodes_is_handed_the_entries_it_should_hold():
    async def main():
        first = await DHTNode.start(config=FAST)
        announcer = Announcer(first, first.identity, model_id="m", total_blocks=8, span_start=0, span_end=8,
                              addresses=["127.0.0.1:1"], dtype="float32", ttl=30)
        await announcer.publish()  # alone: it holds every key itself
        keys = {name: dht_key(name) for name in announcer.entry.key_names}
        newcomer = await DHTNode.start(bootstrap=[first.address], config=FAST)
        await asyncio.sleep(0.2)  # hand-offs are sent without waiting for the join to finish
        held = {name: newcomer.storage.entries(key) for name, key in keys.items()}
        await newcomer.close()
        await first.close()
        return announcer.entry, held

    entry, held = asyncio.run(main())
    # In a two-node swarm the newcomer is among the `ksize` closest nodes of every key.
    assert held == {name: [entry] for name in entry.key_names}


def test_a_node_that_could_not_join_keeps_retrying_its_bootstrap():
    async def main():
        config = DHTConfig(rpc_timeout=0.1, rejoin_interval=0.2)
        absent = await DHTNode.start(config=config)
        port = absent.port
        await absent.close()
        client = await DHTNode.start(bootstrap=[f"127.0.0.1:{port}"], client_mode=True, config=config)
        alone = client.contacts()
        late = await DHTNode.start(port=port, config=config)
        await asyncio.sleep(1.0)
        joined = client.contacts()
        await client.close()
        await late.close()
        return alone, joined, port

    alone, joined, port = asyncio.run(main())
    assert alone == []
    assert joined == [("127.0.0.1", port)]
