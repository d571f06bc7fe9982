"""Iterative kademlia lookup that keeps ``alpha`` queries in flight instead of going in rounds.

kademlia's ``SpiderCrawl`` waits for a whole round of ``alpha`` replies before asking further, so one
dead contact stalls the round for the full timeout; its value lookup returns the first value seen
and drops the others, which lost entries that only some holders had. Here a finished query frees
its slot at once, replies are validated (a malicious node cannot crash the lookup with a bad node
list), and a value lookup gathers the values of ``quorum`` holders for the caller to merge.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from kademlia.node import Node, NodeHeap

from inferencemesh.p2p.identity import DHT_ID_BYTES
from inferencemesh.p2p.protocol import MeshProtocol, RpcResult


@dataclass
class LookupResult:
    nearest: list[Node]  # the closest nodes that answered (or were not asked), nearest first
    values: list[bytes] = field(default_factory=list)  # raw values, one per holder that had one
    unanswered: list[Node] = field(default_factory=list)  # asked, gave no reply (or were backed off)


async def iterative_find(
    protocol: MeshProtocol,
    target: bytes,
    *,
    width: int,
    alpha: int,
    find_value: bool = False,
    quorum: int = 1,
) -> LookupResult:
    """Find the ``width`` nodes closest to ``target`` or, with ``find_value``, values stored there.

    The lookup ends when the ``width`` closest nodes known have all answered (or failed), or when
    ``quorum`` holders returned a value.
    """
    target_node = Node(target)
    nearest = NodeHeap(target_node, width)
    nearest.push(protocol.router.find_neighbors(target_node, k=protocol.router.ksize))
    values: list[bytes] = []
    unanswered: list[Node] = []
    in_flight: dict[asyncio.Future[RpcResult], Node] = {}
    try:
        while len(values) < quorum or not find_value:
            for peer in nearest.get_uncontacted()[: alpha - len(in_flight)]:
                nearest.mark_contacted(peer)
                call = protocol.call_find_value if find_value else protocol.call_find_node
                in_flight[asyncio.ensure_future(call(peer, target_node))] = peer
            if not in_flight:
                break
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                peer = in_flight.pop(future)
                ok, reply = future.result()
                if not ok:
                    nearest.remove([peer.id])
                    unanswered.append(peer)
                elif find_value and isinstance(reply, dict) and isinstance(reply.get("value"), bytes):
                    values.append(reply["value"])
                else:
                    nearest.push(_contacts(reply, protocol.source_node.id, protocol.router.ksize))
    finally:
        for future in in_flight:
            future.cancel()
    return LookupResult(list(nearest), values, unanswered)


def _contacts(reply: object, own_id: bytes, limit: int) -> list[Node]:
    """The well-formed (id, ip, port) triples of a find_node reply, ourselves excluded."""
    if not isinstance(reply, list):
        return []
    nodes = []
    for item in reply[:limit]:
        if (
            isinstance(item, list | tuple)
            and len(item) == 3
            and isinstance(item[0], bytes)
            and len(item[0]) == DHT_ID_BYTES
            and item[0] != own_id
            and isinstance(item[1], str)
            and isinstance(item[2], int)
            and 0 < item[2] < 65536
        ):
            nodes.append(Node(item[0], item[1], item[2]))
    return nodes
