"""A real swarm on loopback: the bootstrap command, 22 DHT nodes in 4 more processes, and a client.

The tests run in file order against one swarm; each reads which workers are alive from ``Swarm``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgpack
import pytest
from kademlia.node import Node
from p2p_forge import claiming_peer, signed, with_bad_signature
from p2p_harness import Proc, start_bootstrap, start_swarm_proc

from inferencemesh.p2p.crawl import iterative_find
from inferencemesh.p2p.identity import Identity
from inferencemesh.p2p.lookup import find_block_providers, swarm_status
from inferencemesh.p2p.node import DHTConfig, DHTNode
from inferencemesh.p2p.records import block_key, decode_entry, dht_key

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BLOCKS = 30
RPC_TIMEOUT = 0.3
STEADY_TTL = 60.0  # longer than the whole module: these workers only leave by withdrawing
CRASH_TTL = 4.0  # the workers that get killed: their entries must vanish this long after


@dataclass
class Swarm:
    bootstrap: str
    procs: list[Proc]
    steady: Proc  # hosts workers 0-6
    doomed: Proc  # hosts workers 7-9, killed by a test
    workers: dict[str, tuple[int, int]] = field(default_factory=dict)  # live worker peer id -> span
    doomed_workers: list[str] = field(default_factory=list)
    steady_workers: list[str] = field(default_factory=list)
    node_ids: dict[str, str] = field(default_factory=dict)  # address -> peer id of every DHT node

    def expected(self) -> dict[int, set[str]]:
        return {b: {p for p, (s, e) in self.workers.items() if s <= b < e} for b in range(BLOCKS)}

    def storing_nodes(self) -> list[Node]:
        nodes = []
        for address, peer in self.node_ids.items():
            host, port = address.rsplit(":", 1)
            nodes.append(Node(bytes.fromhex(peer)[:20], host, int(port)))
        return nodes


def _span(worker: int) -> tuple[int, int]:
    # Blocks 10-19 are served by all ten workers, so every key there gets ten concurrent stores.
    return (0, 20) if worker % 2 == 0 else (10, 30)


def _worker_specs(workers: range) -> list[dict]:
    return [{"model": MODEL, "total": BLOCKS, "start": _span(i)[0], "end": _span(i)[1]} for i in workers]


@pytest.fixture(scope="module")
def swarm():
    boot, boot_addr = start_bootstrap()
    procs = [boot]
    try:
        base = {"bootstrap": boot_addr, "rpc_timeout": RPC_TIMEOUT}
        storers = [start_swarm_proc({**base, "nodes": 6, "workers": [], "ttl": STEADY_TTL}) for _ in range(2)]
        procs += storers
        ready = [p.read_json() for p in storers]
        start_at = time.time() + 3.0  # both worker processes announce at this instant
        steady = start_swarm_proc({**base, "nodes": 0, "workers": _worker_specs(range(7)),
                                   "ttl": STEADY_TTL, "start_at": start_at})
        doomed = start_swarm_proc({**base, "nodes": 0, "workers": _worker_specs(range(7, 10)),
                                   "ttl": CRASH_TTL, "start_at": start_at})
        procs += [steady, doomed]
        ready += [steady.read_json(), doomed.read_json()]
        swarm = Swarm(boot_addr, procs, steady, doomed)
        for message in ready:
            swarm.node_ids.update({n["address"]: n["peer_id"] for n in message["nodes"]})
        swarm.steady_workers = [w["peer_id"] for w in ready[2]["workers"]]
        swarm.doomed_workers = [w["peer_id"] for w in ready[3]["workers"]]
        for i, peer in enumerate(swarm.steady_workers + swarm.doomed_workers):
            swarm.workers[peer] = _span(i)
        assert all(w["min_accepted"] >= 1 for m in ready[2:] for w in m["workers"])
        yield swarm
    finally:
        for proc in procs[1:]:
            proc.close()
        boot.terminate()


def with_client(swarm: Swarm, body: Callable[[DHTNode], Awaitable]):
    async def main():
        config = DHTConfig(rpc_timeout=RPC_TIMEOUT)
        client = await DHTNode.start(bootstrap=[swarm.bootstrap], client_mode=True, config=config)
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(main())


async def resolve(client: DHTNode) -> dict[int, set[str]]:
    providers = await find_block_providers(client, MODEL, BLOCKS)
    return {block: {e.peer_id.hex() for e in entries} for block, entries in providers.items()}


def test_swarm_has_at_least_20_nodes_in_several_processes(swarm):
    assert len(swarm.node_ids) + 1 >= 20  # + the bootstrap node
    assert len(swarm.procs) >= 4


def test_concurrent_announces_lose_no_entry_and_client_resolves_all_blocks(swarm):
    async def resolve_repeatedly(client: DHTNode):
        results = [await resolve(client) for _ in range(5)]
        return results, client.protocol.timeouts

    results, timeouts = with_client(swarm, resolve_repeatedly)
    assert all(found == swarm.expected() for found in results)
    # Each resolve sends 90+ concurrent requests: no reply may be lost to a receive-buffer overflow.
    assert timeouts == 0


def test_swarm_status_lists_model_workers_and_coverage(swarm):
    status = with_client(swarm, swarm_status)
    assert list(status.models) == [MODEL]
    model = status.models[MODEL]
    assert {w.peer_id.hex() for w in model.workers} == set(swarm.workers)
    assert model.coverage == [len(peers) for peers in swarm.expected().values()]
    assert model.missing_blocks == []
    assert {p.hex() for p in status.live_workers} == set(swarm.workers)


def test_storing_nodes_reject_forged_entries(swarm):
    attacker = Identity.generate()

    async def attack(client: DHTNode):
        victim = (await find_block_providers(client, MODEL, 1))[0][0]
        forgeries = {
            "bad signature": (with_bad_signature(signed(attacker, model=MODEL)), block_key(MODEL, 0)),
            "key not matching peer id": (claiming_peer(victim, attacker), block_key(MODEL, 0)),
            "block outside the span": (signed(attacker, model=MODEL, start=0, end=5), block_key(MODEL, 25)),
            "expiry too far ahead": (signed(attacker, model=MODEL, ttl=86400.0), block_key(MODEL, 0)),
            "not an entry": (b"\x93garbage", block_key(MODEL, 0)),
        }
        verdicts = {}
        for name, (wire, key) in forgeries.items():
            replies = await asyncio.gather(
                *(client.protocol.call_store(n, dht_key(key), wire) for n in swarm.storing_nodes())
            )
            verdicts[name] = [verdict for ok, verdict in replies if ok]
        return verdicts, await resolve(client)

    verdicts, providers = with_client(swarm, attack)
    for name, replies in verdicts.items():
        assert len(replies) >= len(swarm.node_ids) - 1, name  # (nearly) every node answered...
        assert all(isinstance(v, str) for v in replies), (name, replies)  # ...with a refusal
    assert providers == swarm.expected()
    assert attacker.peer_id_hex not in set().union(*providers.values())


def test_withdrawal_removes_entry_at_once_and_replays_are_refused(swarm):
    leaver = swarm.steady_workers[0]
    dkey = dht_key(block_key(MODEL, 0))

    async def current_wire(client: DHTNode) -> bytes:
        found = await iterative_find(client.protocol, dkey, width=20, alpha=3, find_value=True, quorum=1)
        wires = [w for value in found.values for w in msgpack.unpackb(value)]
        return next(w for w in wires if decode_entry(w).peer_id.hex() == leaver)

    old_wire = with_client(swarm, current_wire)
    swarm.steady.send({"cmd": "withdraw", "worker": 0})
    assert swarm.steady.read_json()["min_accepted"] >= 1
    del swarm.workers[leaver]

    async def replay(client: DHTNode):
        before = await resolve(client)
        holders = [n for n in swarm.storing_nodes() if await holds_tombstone(client, n)]
        replies = await asyncio.gather(*(client.protocol.call_store(n, dkey, old_wire) for n in holders))
        return before, holders, [verdict for ok, verdict in replies if ok], await resolve(client)

    async def holds_tombstone(client: DHTNode, node: Node) -> bool:
        ok, reply = await client.protocol.call_find_value(node, Node(dkey))
        if not ok or not isinstance(reply, dict):
            return False
        entries = [decode_entry(w) for w in msgpack.unpackb(reply["value"])]
        return any(e.peer_id.hex() == leaver and e.withdrawn for e in entries)

    before, holders, verdicts, after = with_client(swarm, replay)
    assert before == swarm.expected()  # gone long before its 60 s expiry
    # Every node holding the withdrawal refuses the older entry. (A node that never saw this peer
    # under this key cannot tell a replay from news: that window is bounded by the entry's expiry.)
    assert len(holders) >= 3
    assert len(verdicts) == len(holders)
    assert all(isinstance(v, str) and "stale seq" in v for v in verdicts), verdicts
    assert after == swarm.expected()


def test_crashed_workers_vanish_after_expiry_and_lookups_stay_fast(swarm):
    swarm.doomed.kill()
    killed_at = time.monotonic()
    for peer in swarm.doomed_workers:
        del swarm.workers[peer]

    async def watch(client: DHTNode):
        durations = []
        while time.monotonic() - killed_at < CRASH_TTL + 10:
            started = time.monotonic()
            found = await resolve(client)
            durations.append(time.monotonic() - started)
            if found == swarm.expected():
                return time.monotonic() - killed_at, durations
            await asyncio.sleep(0.2)
        return None, durations

    gone_after, durations = with_client(swarm, watch)
    assert gone_after is not None, "crashed workers' entries outlived their expiry"
    # Stock kademlia waited 5 s per dead contact; with short timeouts, retry and back-off no lookup of
    # all 30 blocks stalls for seconds even though three storing nodes died with the workers.
    assert max(durations) < 1.5, durations
    fresh = with_client(swarm, resolve)
    assert fresh == swarm.expected()
