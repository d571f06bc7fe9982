"""A DHT node: kademlia routing with our protocol, storage and lookups, started in one call.

kademlia's ``Server`` is not subclassed: its ``set``/``get``/``set_digest`` are exactly the
semantics we replace (whole-value overwrite, first value wins, a crash when no node is found, hourly
republishing), so keeping them reachable would only leave traps. Its building blocks are reused:
``RoutingTable`` (inside ``KademliaProtocol``), ``Node`` and ``NodeHeap``.

A node runs in server mode (stores entries, is routed through; workers and bootstrap nodes) or in
client mode (asks only; no server ever adds it to a routing table, and it stores nothing).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgpack
from kademlia.node import Node

from inferencemesh.p2p.address import PeerAddress, format_host_port, parse_peer_address, to_multiaddr
from inferencemesh.p2p.crawl import LookupResult, iterative_find
from inferencemesh.p2p.errors import RecordError
from inferencemesh.p2p.identity import DHT_ID_BYTES, Identity, short_id
from inferencemesh.p2p.protocol import MeshProtocol
from inferencemesh.p2p.records import EntryCache, ProviderEntry, dht_key
from inferencemesh.p2p.storage import DEFAULT_MAX_TTL, RecordStorage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DHTConfig:
    ksize: int = 20  # bucket size and lookup width (the paper's k)
    alpha: int = 3  # queries in flight per lookup
    replication: int = 5  # how many of the closest nodes store each entry
    quorum: int = 2  # a lookup merges the entries of this many holders
    lookup_concurrency: int = 32  # keys looked up (or published) at once
    max_in_flight: int = 32  # RPCs awaiting a reply at once (keeps reply bursts within the UDP buffer)
    receive_buffer_bytes: int = 1 << 20  # SO_RCVBUF asked for (the kernel caps it at net.core.rmem_max)
    rpc_timeout: float = 1.0  # seconds per attempt
    rpc_retries: int = 1  # extra attempts before a contact is evicted
    backoff_base: float = 2.0  # first back-off of an evicted contact, in seconds; doubles per failure
    backoff_max: float = 120.0
    max_ttl: float = DEFAULT_MAX_TTL  # storing nodes refuse entries expiring further ahead
    rejoin_interval: float = 5.0  # how often a node with no contacts retries its bootstrap addresses
    refresh_interval: float = 600.0  # how often buckets idle for an hour are refreshed (paper: hourly)


@dataclass(frozen=True)
class StoreResult:
    accepted: int  # nodes (this one included) that took the entry
    unreached: int  # of the `replication` closest nodes found, those that did not answer (crawl or store)


class DHTNode:
    """One DHT node. Create it with :meth:`start`; close it with :meth:`close`."""

    def __init__(self, identity: Identity, config: DHTConfig, client_mode: bool) -> None:
        self.identity = identity
        self.config = config
        self.client_mode = client_mode
        self.storage = RecordStorage(max_ttl=config.max_ttl)
        self.protocol: MeshProtocol | None = None
        self._node = Node(identity.dht_id)
        self._cache = EntryCache()
        # Replay protection on the reading side, as (seq, expiry): the newest entry accepted per
        # (peer id, DHT key), and each peer's latest withdrawal. Forgotten once expired: an older
        # entry expired no later (same publisher, same TTL), so nothing is left to replay.
        self._latest_seq: dict[tuple[bytes, bytes], tuple[int, float]] = {}
        self._withdrawn_seq: dict[bytes, tuple[int, float]] = {}
        self._bootstrap: list[PeerAddress] = []
        self._transport: asyncio.DatagramTransport | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._limit = asyncio.Semaphore(config.lookup_concurrency)
        self.host = ""
        self.port = 0

    @classmethod
    async def start(
        cls,
        identity: Identity | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bootstrap: Iterable[PeerAddress | str] = (),
        client_mode: bool = False,
        config: DHTConfig | None = None,
    ) -> DHTNode:
        """Listen on UDP ``host:port`` (0 = any free port) and join through ``bootstrap``.

        Bootstrap addresses may be :class:`PeerAddress` or text (``HOST:PORT`` or multiaddr). If none
        answers, the node still starts and keeps retrying them in the background.
        """
        node = cls(identity or Identity.generate(), config or DHTConfig(), client_mode)
        node._bootstrap = [a if isinstance(a, PeerAddress) else parse_peer_address(a) for a in bootstrap]
        await node._listen(host, port)
        await node.join()
        node._maintenance = asyncio.ensure_future(node._maintain())
        return node

    async def _listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._transport, self.protocol = await loop.create_datagram_endpoint(
            lambda: MeshProtocol(
                self._node,
                self.storage,
                self.config.ksize,
                rpc_timeout=self.config.rpc_timeout,
                rpc_retries=self.config.rpc_retries,
                backoff_base=self.config.backoff_base,
                backoff_max=self.config.backoff_max,
                client_mode=self.client_mode,
                max_in_flight=self.config.max_in_flight,
            ),
            local_addr=(host, port),
        )
        sock = self._transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.receive_buffer_bytes)
        self.host, self.port = self._transport.get_extra_info("sockname")[:2]
        mode = "client" if self.client_mode else "server"
        log.info("DHT %s node %s listening on %s", mode, self.identity.short_id, self.address)

    @property
    def peer_id(self) -> bytes:
        return self.identity.peer_id

    @property
    def address(self) -> str:
        return format_host_port(self.host, self.port)

    @property
    def multiaddr(self) -> str:
        return to_multiaddr(self.host, self.port, self.peer_id)

    def contacts(self) -> list[tuple[str, int]]:
        """Addresses of the nodes in this node's routing table."""
        assert self.protocol is not None
        return [(n.ip, n.port) for bucket in self.protocol.router.buckets for n in bucket.get_nodes()]

    async def join(self) -> int:
        """Ping the bootstrap addresses, then look up our own id to fill the routing table.

        Returns how many bootstrap nodes answered. A ``/p2p/PEERID`` address whose node answers
        with another id is not used.
        """
        assert self.protocol is not None
        answers = await asyncio.gather(*(self._ping_bootstrap(a) for a in self._bootstrap))
        joined = [node for node in answers if node is not None]
        for node in joined:
            self.protocol.welcome_if_new(node)
        if joined:
            await self._crawl(self._node.id)
        elif self._bootstrap:
            log.warning(
                "no bootstrap node answered (%s); retrying every %.0f s",
                ", ".join(map(str, self._bootstrap)),
                self.config.rejoin_interval,
            )
        return len(joined)

    async def _ping_bootstrap(self, address: PeerAddress) -> Node | None:
        assert self.protocol is not None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                address.host, address.port, type=socket.SOCK_DGRAM
            )
        except OSError as exc:
            log.warning("cannot resolve bootstrap address %s: %s", address, exc)
            return None
        family = self._transport.get_extra_info("socket").family if self._transport else socket.AF_INET
        ips = [info[4][0] for info in infos if info[0] == family]
        if not ips:
            log.warning("bootstrap address %s has no address of this socket's family", address)
            return None
        node_id = await self.protocol.ping_address((ips[0], address.port))
        if node_id is None:
            return None
        if address.peer_id is not None and node_id != address.peer_id[:DHT_ID_BYTES]:
            log.warning(
                "bootstrap node at %s is not peer %s; ignoring it", address, short_id(address.peer_id)
            )
            return None
        return Node(node_id, ips[0], address.port)

    async def _maintain(self) -> None:
        """Rejoin while the routing table is empty; refresh buckets that saw no lookup for an hour."""
        assert self.protocol is not None
        since_refresh = 0.0
        while True:
            await asyncio.sleep(self.config.rejoin_interval)
            since_refresh += self.config.rejoin_interval
            if not self.contacts() and self._bootstrap:
                await self.join()
            self._forget_expired_seqs()
            if since_refresh >= self.config.refresh_interval:
                since_refresh = 0.0
                for target in self.protocol.get_refresh_ids():
                    await self._crawl(target)

    async def _crawl(
        self, target: bytes, *, width: int | None = None, find_value: bool = False, quorum: int = 1
    ) -> LookupResult:
        assert self.protocol is not None
        return await iterative_find(
            self.protocol,
            target,
            width=width or self.config.ksize,
            alpha=self.config.alpha,
            find_value=find_value,
            quorum=quorum,
        )

    # ---------------------------------------------------------------- storing
    async def store_entry(self, key_name: str, wire: bytes) -> StoreResult:
        """Store one signed entry under ``key_name`` on the closest nodes it can reach.

        Never raises for network trouble: ``accepted == 0`` means no node (not even this one) took it.
        """
        assert self.protocol is not None
        dkey = dht_key(key_name)
        async with self._limit:
            # Only the `replication` closest matter here, so the crawl stops once those answered.
            found = await self._crawl(dkey, width=self.config.replication)
            targets = found.nearest
            replies = await asyncio.gather(*(self.protocol.call_store(n, dkey, wire) for n in targets))
        accepted = sum(1 for ok, verdict in replies if ok and verdict is True)
        for node, (ok, verdict) in zip(targets, replies, strict=True):
            if ok and verdict is not True:
                log.debug("%s refused %s: %s", node, key_name, verdict)
        if self._should_hold(dkey, targets):
            try:
                self.storage.store(dkey, wire)
                accepted += 1
            except RecordError as exc:
                log.debug("refused own entry under %s: %s", key_name, exc)
        silent = found.unanswered + [n for n, (ok, _) in zip(targets, replies, strict=True) if not ok]
        return StoreResult(accepted, self._count_closest(dkey, targets, silent))

    def _count_closest(self, dkey: bytes, targets: Sequence[Node], silent: Sequence[Node]) -> int:
        """How many of ``silent`` rank among the ``replication`` closest of ``targets + silent``.

        Those are the holders a lookup asks first; one that missed the store (it was busy, a reply
        was lost, or it is dead) may answer a lookup without the entry.
        """
        keynode = Node(dkey)
        silent_ids = {n.id for n in silent}
        ranked = sorted({n.id: n for n in [*targets, *silent]}.values(), key=lambda n: n.distance_to(keynode))
        return sum(1 for n in ranked[: self.config.replication] if n.id in silent_ids)

    def _should_hold(self, dkey: bytes, targets: Sequence[Node]) -> bool:
        """A server node keeps an entry itself when it is among the ``replication`` closest nodes."""
        if self.client_mode:
            return False
        if len(targets) < self.config.replication:
            return True
        keynode = Node(dkey)
        return self._node.distance_to(keynode) < max(n.distance_to(keynode) for n in targets)

    # ---------------------------------------------------------------- finding
    async def find_entries(self, key_names: Sequence[str]) -> dict[str, list[ProviderEntry]]:
        """Look up several keys concurrently; returns each key's verified live entries, one per peer.

        Entries that fail verification, are expired, belong under another key, or carry an older
        ``seq`` than this node already accepted from the same peer under the same key (or than that
        peer's withdrawal) are dropped; so are peers whose latest entry is a withdrawal. Keys nobody
        holds map to an empty list; never raises for network trouble.
        """
        values = await asyncio.gather(*(self._find_values(dht_key(name)) for name in key_names))
        found = zip(key_names, values, strict=True)
        return {name: self._merge(dht_key(name), raw_values) for name, raw_values in found}

    async def _find_values(self, dkey: bytes) -> list[bytes]:
        assert self.protocol is not None
        local = [] if self.client_mode else [v for v in [self.storage.get(dkey)] if v is not None]
        async with self._limit:
            found = await self._crawl(dkey, find_value=True, quorum=self.config.quorum - len(local))
        return local + found.values

    def _merge(self, dkey: bytes, values: list[bytes]) -> list[ProviderEntry]:
        now = time.time()
        newest: dict[bytes, ProviderEntry] = {}
        for entry in self._verified_entries(values):
            if dkey not in entry.dht_keys or entry.is_expired(now):
                continue
            if self._is_replay(dkey, entry):
                continue
            held = newest.get(entry.peer_id)
            if held is None or entry.seq > held.seq:
                newest[entry.peer_id] = entry
        for entry in newest.values():
            self._latest_seq[(entry.peer_id, dkey)] = (entry.seq, entry.expiry)
            if entry.withdrawn and entry.seq > self._withdrawn_seq.get(entry.peer_id, (-1, 0.0))[0]:
                self._withdrawn_seq[entry.peer_id] = (entry.seq, entry.expiry)
        return sorted((e for e in newest.values() if not e.withdrawn), key=lambda e: e.peer_id)

    def _is_replay(self, dkey: bytes, entry: ProviderEntry) -> bool:
        """True for an entry older than one this node already accepted under the same key, or older
        than a withdrawal of the same peer (under any key).

        Seq is compared per key, not per peer: a refresh reaches the holders of a worker's keys one
        key at a time, so a newer seq under one key says nothing yet about the others.
        """
        if entry.seq < self._latest_seq.get((entry.peer_id, dkey), (-1, 0.0))[0]:
            return True
        return entry.seq < self._withdrawn_seq.get(entry.peer_id, (-1, 0.0))[0]

    def _forget_expired_seqs(self) -> None:
        now = time.time()
        self._latest_seq = {k: v for k, v in self._latest_seq.items() if v[1] > now}
        self._withdrawn_seq = {k: v for k, v in self._withdrawn_seq.items() if v[1] > now}

    def _verified_entries(self, values: list[bytes]) -> Iterable[ProviderEntry]:
        for value in values:
            try:
                wires = msgpack.unpackb(value)
            except (ValueError, TypeError) as exc:  # msgpack raises ValueError subclasses
                log.debug("dropped an undecodable value: %r", exc)
                continue
            for wire in wires if isinstance(wires, list) else []:
                try:
                    yield self._cache.decode(wire)
                except RecordError as exc:
                    log.debug("dropped an entry: %s", exc)

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
