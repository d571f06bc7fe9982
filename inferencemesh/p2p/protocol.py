"""kademlia's RPC protocol with the failure handling a swarm of short-lived workers needs.

Changes to ``KademliaProtocol`` as it ships (each has a test in tests/p2p):

- requests in flight are bounded, so reply bursts do not overflow the socket's receive buffer;
- the RPC timeout is configurable (stock: fixed 5 s) and a timed-out call is retried before the
  contact is evicted (stock: one missed reply evicts);
- an evicted contact is backed off (doubling, capped) so lookups stop paying timeouts for it, until
  it contacts us again;
- stores go to :class:`~inferencemesh.p2p.storage.RecordStorage`, whose verdict is the RPC reply;
- a client-mode node sends no node id and answers no requests, so servers never add it to their
  routing tables and never route or store through it;
- malformed or oversized datagrams and replies that arrive after their caller gave up are dropped
  quietly instead of raising inside the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from inferencemesh.p2p.errors import RecordError
from inferencemesh.p2p.identity import DHT_ID_BYTES
from inferencemesh.p2p.storage import RecordStorage

log = logging.getLogger(__name__)

# rpcudp refuses to send requests over 8 KiB, so larger ones can only come from a misbehaving peer.
MAX_REQUEST_BYTES = 8192 + 21
_REQUEST = 0

RpcResult = tuple[bool, Any]


class MeshProtocol(KademliaProtocol):
    def __init__(
        self,
        source_node: Node,
        storage: RecordStorage,
        ksize: int,
        *,
        rpc_timeout: float,
        rpc_retries: int,
        backoff_base: float,
        backoff_max: float,
        client_mode: bool,
        max_in_flight: int,
    ) -> None:
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = rpc_timeout
        self.rpc_retries = rpc_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.client_mode = client_mode
        self.requests_sent = 0
        self.timeouts = 0
        # Replies to a burst of requests arrive together; past a few dozen they overflow the default
        # UDP receive buffer (measured: 90 concurrent find_value replies lost some, each costing a
        # timeout). Bounding requests in flight keeps bursts inside it.
        self._in_flight = asyncio.Semaphore(max_in_flight)
        # (ip, port) -> (monotonic time until which we skip it, current delay)
        self._backoff: dict[tuple[str, int], tuple[float, float]] = {}
        self._handoffs: set[asyncio.Future[RpcResult]] = set()

    # ---------------------------------------------------------------- outgoing calls
    async def call_ping(self, node_to_ask: Node) -> RpcResult:
        return await self._call(node_to_ask, "ping")

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> RpcResult:
        return await self._call(node_to_ask, "find_node", node_to_find.id)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> RpcResult:
        return await self._call(node_to_ask, "find_value", node_to_find.id)

    async def call_store(self, node_to_ask: Node, key: bytes, value: bytes) -> RpcResult:
        return await self._call(node_to_ask, "store", key, value)

    async def ping_address(self, address: tuple[str, int]) -> bytes | None:
        """Ping an address whose node id is unknown (a bootstrap node); returns its id if it answers."""
        for _ in range(1 + self.rpc_retries):
            ok, node_id = await self._send(address, "ping")
            if ok:
                return node_id if _is_node_id(node_id) else None
        return None

    def is_backed_off(self, address: tuple[str, int]) -> bool:
        until = self._backoff.get(address, (0.0, 0.0))[0]
        return time.monotonic() < until

    async def _call(self, node: Node, name: str, *args: Any) -> RpcResult:
        address = (node.ip, node.port)
        if self.is_backed_off(address):
            return False, None
        result: RpcResult = (False, None)
        async with self._in_flight:
            for _ in range(1 + self.rpc_retries):
                result = await self._send(address, name, *args)
                if result[0]:
                    break
        return self.handle_call_response(result, node)

    def _send(self, address: tuple[str, int], name: str, *args: Any) -> asyncio.Future[RpcResult]:
        self.requests_sent += 1
        own_id = None if self.client_mode else self.source_node.id
        # rpcudp turns an unknown attribute into a remote call of rpc_<name>.
        return getattr(self, name)(address, own_id, *args)

    def handle_call_response(self, result: RpcResult, node: Node) -> RpcResult:
        address = (node.ip, node.port)
        if not result[0]:
            log.debug("no reply from %s after %d tries; evicting and backing off", node, 1 + self.rpc_retries)
            self.router.remove_contact(node)
            until, delay = self._backoff.get(address, (0.0, self.backoff_base / 2))
            # Calls sent together fail together (a burst of 30 lookups caught one busy moment):
            # they count as one failure, or that moment would back the node off for minutes.
            if time.monotonic() >= until:
                delay = min(delay * 2, self.backoff_max)
                self._backoff[address] = (time.monotonic() + delay, delay)
            return result
        self._backoff.pop(address, None)
        self.welcome_if_new(node)
        return result

    # ---------------------------------------------------------------- incoming requests
    def rpc_ping(self, sender: tuple[str, int], nodeid: bytes | None) -> bytes:
        self._welcome_sender(sender, nodeid)
        return self.source_node.id

    def rpc_store(
        self, sender: tuple[str, int], nodeid: bytes | None, key: bytes, value: bytes
    ) -> bool | str:
        """True when stored, otherwise the reason it was refused."""
        self._welcome_sender(sender, nodeid)
        if not _is_node_id(key):
            return "a key is 20 bytes"
        try:
            self.storage.store(key, value)
        except RecordError as exc:
            log.debug("refused a store from %s: %s", sender, exc)
            return str(exc)
        return True

    def rpc_find_node(self, sender: tuple[str, int], nodeid: bytes | None, key: bytes) -> list[tuple]:
        self._welcome_sender(sender, nodeid)
        if not _is_node_id(key):
            return []
        exclude = Node(nodeid, sender[0], sender[1]) if _is_node_id(nodeid) else None
        return [tuple(n) for n in self.router.find_neighbors(Node(key), exclude=exclude)]

    def rpc_find_value(self, sender: tuple[str, int], nodeid: bytes | None, key: bytes) -> list[tuple] | dict:
        value = self.storage.get(key) if _is_node_id(key) else None
        if value is None:
            return self.rpc_find_node(sender, nodeid, key)
        self._welcome_sender(sender, nodeid)
        return {"value": value}

    def _welcome_sender(self, sender: tuple[str, int], nodeid: bytes | None) -> None:
        if not _is_node_id(nodeid):
            return  # a client: it asked, but it is no member of the routing table
        # A request proves the sender is alive, so it is no longer backed off.
        self._backoff.pop(sender, None)
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))

    def welcome_if_new(self, node: Node) -> None:
        """Add a new contact; if it is closer to some of our keys than we are, hand it those entries.

        Same rule as the paper and stock kademlia (only the closest holder hands off), but entry by
        entry, because our store RPC carries one signed entry; stock also hashed the key a second
        time here, handing values to the wrong nodes.
        """
        if node.id == self.source_node.id or not self.router.is_new_node(node):
            return
        if not self.client_mode:
            self._hand_off_entries(node)
        self.router.add_contact(node)

    def _hand_off_entries(self, node: Node) -> None:
        decisions: dict[bytes, bool] = {}
        for dkey, wire in self.storage:
            if dkey not in decisions:
                decisions[dkey] = self._newcomer_takes(node, dkey)
            if decisions[dkey]:
                # Fire and forget: a lost hand-off is repaired by the publisher's next refresh.
                handoff = self._send((node.ip, node.port), "store", dkey, wire)
                self._handoffs.add(handoff)
                handoff.add_done_callback(self._handoffs.discard)

    def _newcomer_takes(self, node: Node, dkey: bytes) -> bool:
        keynode = Node(dkey)
        neighbors = self.router.find_neighbors(keynode)
        if not neighbors:
            return True
        newcomer_close = node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
        we_closest = self.source_node.distance_to(keynode) < neighbors[0].distance_to(keynode)
        return newcomer_close and we_closest

    # ---------------------------------------------------------------- datagram hardening
    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > MAX_REQUEST_BYTES and data[0] == _REQUEST:
            log.debug("dropped a %d-byte request from %s", len(data), addr)
            return
        super().datagram_received(data, addr)

    async def _solve_datagram(self, datagram: bytes, address: tuple[str, int]) -> None:
        try:
            await super()._solve_datagram(datagram, address)
        except Exception as exc:  # anything a remote peer sends must not raise in the event loop
            log.debug("dropped a malformed datagram from %s: %r", address, exc)

    async def _accept_request(self, msg_id: bytes, data: Any, address: tuple[str, int]) -> None:
        if self.client_mode:
            return  # a client serves nobody: silence also keeps it out of anyone's routing table
        try:
            await super()._accept_request(msg_id, data, address)
        except Exception as exc:  # a request with the wrong arguments or types from a remote peer
            log.debug("dropped a malformed request from %s: %r", address, exc)

    def _accept_response(self, msg_id: bytes, data: Any, address: tuple[str, int]) -> None:
        pending = self._outstanding.get(msg_id)
        if pending is None:
            log.debug("dropped a reply from %s that nobody waits for", address)
            return
        if pending[0].done():
            # Its caller was cancelled (a lookup that had enough answers): nobody waits for it.
            pending[1].cancel()
            del self._outstanding[msg_id]
            return
        super()._accept_response(msg_id, data, address)

    def _timeout(self, msg_id: bytes) -> None:
        future, _ = self._outstanding.pop(msg_id)
        if not future.done():
            self.timeouts += 1
            future.set_result((False, None))


def _is_node_id(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == DHT_ID_BYTES
