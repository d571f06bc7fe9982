"""Clients verify what holders return: a holder that stores anything cannot fool them."""

import asyncio

import msgpack
from kademlia.storage import ForgetfulStorage
from p2p_forge import claiming_peer, make_entry, signed, with_bad_signature

from inferencemesh.p2p.identity import Identity
from inferencemesh.p2p.lookup import find_block_providers
from inferencemesh.p2p.node import DHTConfig, DHTNode
from inferencemesh.p2p.records import block_key, decode_entry, dht_key

CONFIG = DHTConfig(rpc_timeout=0.2)


def test_client_drops_forged_misplaced_replayed_and_withdrawn_entries():
    honest, leaver, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    current = signed(honest, model="m", seq=2)
    older = signed(honest, model="m", seq=1)
    leaver_live = signed(leaver, model="m", seq=1)
    leaver_gone = signed(leaver, model="m", seq=2, withdrawn=True)
    forged = [
        with_bad_signature(signed(mallory, model="m")),
        claiming_peer(decode_entry(current), mallory),
        signed(mallory, model="m", start=5, end=10),  # valid, but not an entry of block 0
        signed(mallory, model="m", ttl=-1),  # expired
        b"\x00not an entry",
    ]

    async def main():
        # A node running our protocol over kademlia's stock storage: it keeps whatever it is given.
        evil = await DHTNode.start(config=CONFIG)
        evil.protocol.storage = ForgetfulStorage()
        client = await DHTNode.start(bootstrap=[evil.address], client_mode=True, config=CONFIG)
        key = dht_key(block_key("m", 0))
        evil.protocol.storage[key] = msgpack.packb([current, leaver_gone, *forged])
        first = await find_block_providers(client, "m", 1)
        # Later the holder serves older, still unexpired, validly signed entries of the same peers.
        evil.protocol.storage[key] = msgpack.packb([older, leaver_live])
        second = await find_block_providers(client, "m", 1)
        evil.protocol.storage[key] = b"\xc1 not even msgpack"
        third = await find_block_providers(client, "m", 1)
        await client.close()
        await evil.close()
        return first[0], second[0], third[0]

    first, second, third = asyncio.run(main())
    assert first == [decode_entry(current)]
    assert second == []
    assert third == []


def test_client_keeps_the_newest_entry_of_each_peer_across_holders():
    alice = Identity.generate()

    async def main():
        # Two holders that do not check seqs; the client asks both (quorum 2) and merges.
        holders = [await DHTNode.start(config=CONFIG) for _ in range(2)]
        for holder in holders:
            holder.protocol.storage = ForgetfulStorage()
        client = await DHTNode.start(bootstrap=[h.address for h in holders], client_mode=True, config=CONFIG)
        key = dht_key(block_key("m", 0))
        holders[0].protocol.storage[key] = msgpack.packb([signed(alice, model="m", seq=3, load=0.3)])
        holders[1].protocol.storage[key] = msgpack.packb([signed(alice, model="m", seq=7, load=0.7)])
        found = await find_block_providers(client, "m", 1)
        await client.close()
        for holder in holders:
            await holder.close()
        return found[0]

    found = asyncio.run(main())
    assert [(e.seq, e.load) for e in found] == [(7, 0.7)]
    assert found[0] == make_entry(alice, model="m", seq=7, load=0.7, expiry=found[0].expiry)
