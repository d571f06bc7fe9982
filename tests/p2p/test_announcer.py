"""The Announcer against real DHT nodes on loopback (one process)."""

import asyncio
import itertools

import pytest

from inferencemesh.p2p.announcer import Announcer
from inferencemesh.p2p.errors import RecordError
from inferencemesh.p2p.identity import Identity
from inferencemesh.p2p.lookup import find_block_providers
from inferencemesh.p2p.node import DHTConfig, DHTNode
from inferencemesh.p2p.records import dht_key

CONFIG = DHTConfig(rpc_timeout=0.2)


async def small_swarm(n: int = 4, config: DHTConfig = CONFIG) -> list[DHTNode]:
    first = await DHTNode.start(config=config)
    rest = [await DHTNode.start(bootstrap=[first.address], config=config) for _ in range(n - 1)]
    return [first, *rest]


def make_announcer(node: DHTNode, ttl: float) -> Announcer:
    return Announcer(node, node.identity, model_id="m", total_blocks=4, span_start=1, span_end=3,
                     addresses=["127.0.0.1:7001"], dtype="bfloat16", decode_tps=50.0, ttl=ttl)


# Five nodes besides the publisher, replication 5: every one of them is among each key's closest.
REPAIRING = DHTConfig(rpc_timeout=0.25, backoff_base=0.3)


async def publisher_and_stalled_node() -> tuple[list[DHTNode], Announcer, DHTNode]:
    nodes = await small_swarm(6, REPAIRING)
    return nodes, make_announcer(nodes[1], ttl=30), nodes[3]


def held(node: DHTNode, keys: list[str]) -> list[list[tuple[int, bool]]]:
    """(seq, withdrawn) of the entries ``node`` stores under each key."""
    return [[(e.seq, e.withdrawn) for e in node.storage.entries(dht_key(key))] for key in keys]


def test_refreshes_keep_an_entry_alive_past_its_ttl_and_stop_withdraws_it():
    async def main():
        nodes = await small_swarm()
        announcer = make_announcer(nodes[1], ttl=1.2)
        await announcer.start()
        first_seq = announcer.entry.seq
        client = await DHTNode.start(bootstrap=[nodes[0].address], client_mode=True, config=CONFIG)
        await asyncio.sleep(2.0)  # past the TTL of the first publish: only refreshes keep it
        alive = await find_block_providers(client, "m", 4)
        refreshed_seq = announcer.entry.seq
        await announcer.stop()
        after_stop = await find_block_providers(client, "m", 4)
        for node in [client, *nodes]:
            await node.close()
        return first_seq, refreshed_seq, alive, after_stop

    first_seq, refreshed_seq, alive, after_stop = asyncio.run(main())
    assert refreshed_seq > first_seq
    assert [len(alive[b]) for b in range(4)] == [0, 1, 1, 0]
    assert alive[1][0].seq > first_seq and alive[1][0].dtype == "bfloat16"
    assert after_stop == {b: [] for b in range(4)}


def test_updated_dynamic_fields_are_published():
    neighbour = Identity.generate().peer_id

    async def main():
        nodes = await small_swarm()
        announcer = make_announcer(nodes[2], ttl=30)
        await announcer.start()
        announcer.update(free_cache_tokens=777, load=0.25, decode_tps=80.0, prefill_tps=900.0,
                         rtts={neighbour: 0.003})
        report = await announcer.publish()
        client = await DHTNode.start(bootstrap=[nodes[0].address], client_mode=True, config=CONFIG)
        found = await find_block_providers(client, "m", 4)
        await announcer.stop()
        for node in [client, *nodes]:
            await node.close()
        return report, found[2][0]

    report, entry = asyncio.run(main())
    assert report.failed_keys == [] and len(report.accepted) == 4  # 2 blocks + directory + index
    assert report.unreached == {} and report.keys_to_repair == []
    assert (entry.free_cache_tokens, entry.load) == (777, 0.25)
    assert (entry.decode_tps, entry.prefill_tps) == (80.0, 900.0)
    assert entry.rtts == {neighbour: 0.003}


def test_a_closest_node_that_missed_the_announce_is_given_the_entry_once_it_answers_again():
    async def main():
        nodes, announcer, stalled = await publisher_and_stalled_node()
        keys = announcer.entry.key_names
        try:
            stalled._transport.pause_reading()  # a busy node: requests wait unread in its socket
            report = await announcer.publish()
            held_while_stalled = held(stalled, keys)
            stalled._transport.resume_reading()
            await announcer.settled()
            return report, announcer.entry.seq, held_while_stalled, held(stalled, keys)
        finally:
            await announcer.stop()
            for node in nodes:
                await node.close()

    report, seq, held_while_stalled, held_after = asyncio.run(main())
    assert report.failed_keys == [] and set(report.accepted.values()) == {5}  # 4 others + itself
    assert report.unreached == dict.fromkeys(report.accepted, 1)
    assert held_while_stalled == [[]] * 4
    assert held_after == [[(seq, False)]] * 4


def test_a_closest_node_that_missed_the_withdrawal_drops_the_entry_once_it_answers_again():
    async def main():
        nodes, announcer, stalled = await publisher_and_stalled_node()
        keys = announcer.entry.key_names
        try:
            await announcer.start()
            await announcer.settled()
            live_seq = announcer.entry.seq
            stalled._transport.pause_reading()
            stopping = asyncio.ensure_future(announcer.stop(settle_within=10.0))
            await asyncio.sleep(1.0)  # the withdrawal is out; the stalled node has not read it
            held_while_stalled = held(stalled, keys)
            stalled._transport.resume_reading()
            report = await stopping
            return report, live_seq, announcer.entry.seq, held_while_stalled, held(stalled, keys)
        finally:
            for node in nodes:
                await node.close()

    report, live_seq, withdrawn_seq, held_while_stalled, held_after = asyncio.run(main())
    assert report.unreached == dict.fromkeys(report.accepted, 1)
    assert held_while_stalled == [[(live_seq, False)]] * 4
    assert held_after == [[(withdrawn_seq, True)]] * 4


def test_refreshes_keep_their_cadence_when_publishing_is_slow():
    # A node that never answers makes every publish wait for its timeouts (no back-off to skip it).
    config = DHTConfig(rpc_timeout=0.3, backoff_base=0.01)
    ttl = 1.5

    async def main():
        nodes = await small_swarm(4, config)
        nodes[2]._transport.pause_reading()
        announcer = make_announcer(nodes[1], ttl=ttl)
        slowest = (await announcer.start()).seconds
        seqs = {announcer.entry.seq}
        for _ in range(70):  # 3.5 s
            await asyncio.sleep(0.05)
            seqs.add(announcer.entry.seq)
        await announcer.stop()
        for node in nodes:
            await node.close()
        return slowest, sorted(seqs)

    slowest, seqs = asyncio.run(main())
    assert slowest >= 0.5  # each publish waited for the silent node
    starts = [seq / 1e6 for seq in seqs]  # a seq is its publish's start, in microseconds
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert len(gaps) >= 4
    assert max(gaps) < ttl / 3 + 0.15, gaps  # not ttl/3 + the publish's own time


def test_bad_fields_are_refused_up_front():
    async def main():
        node = await DHTNode.start(config=CONFIG)
        try:
            with pytest.raises(RecordError):
                Announcer(node, node.identity, model_id="m", total_blocks=4, span_start=3, span_end=9,
                          addresses=["127.0.0.1:7001"], dtype="float32")
            announcer = make_announcer(node, ttl=30)
            with pytest.raises(RecordError):
                announcer.update(load=float("nan"))
            assert announcer.entry.load == 0.0
            many = {Identity.generate().peer_id: i / 1000 for i in range(40)}
            announcer.update(rtts=many)
            assert sorted(announcer.entry.rtts.values()) == [i / 1000 for i in range(24)]  # nearest kept
        finally:
            await node.close()

    asyncio.run(main())
