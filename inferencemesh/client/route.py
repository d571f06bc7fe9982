"""Choosing the chain of workers for a session: DHT lookup, RTT probes, the planner, a ban list."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

from inferencemesh.client.runtime import MeshRuntime
from inferencemesh.p2p.address import parse_host_port
from inferencemesh.p2p.identity import short_id
from inferencemesh.p2p.lookup import find_block_providers
from inferencemesh.p2p.records import ProviderEntry
from inferencemesh.p2p.routing import CostModel, Route, plan_route
from inferencemesh.protocol.messages import MessageKind, WorkerError
from inferencemesh.transport.errors import TransportError

log = logging.getLogger(__name__)


@dataclass
class BanList:
    """Peers that failed recently; each ban lasts ``base_s`` doubling per repeated failure."""

    base_s: float = 10.0
    max_s: float = 300.0
    _until: dict[bytes, float] = field(default_factory=dict)
    _strikes: dict[bytes, int] = field(default_factory=dict)

    def ban(self, peer_id: bytes, reason: str) -> None:
        strikes = self._strikes.get(peer_id, 0) + 1
        self._strikes[peer_id] = strikes
        duration = min(self.max_s, self.base_s * 2 ** (strikes - 1))
        self._until[peer_id] = time.monotonic() + duration
        log.info("banned worker %s for %.0f s: %s", short_id(peer_id), duration, reason)

    def banned(self) -> set[bytes]:
        now = time.monotonic()
        return {peer for peer, until in self._until.items() if until > now}


def entry_address(entry: ProviderEntry) -> tuple[str, int]:
    return parse_host_port(entry.addresses[0])


async def probe(runtime: MeshRuntime, entry: ProviderEntry, model_id: str, timeout: float) -> float | None:
    """RTT in seconds of a PING to a worker, or None when it does not answer or serves another model."""
    started = time.perf_counter()
    try:
        reply = await runtime.request(entry.peer_id, entry_address(entry), MessageKind.PING, {}, timeout)
    except (TransportError, WorkerError, ValueError) as exc:
        log.debug("probe of %s failed: %s", short_id(entry.peer_id), exc)
        return None
    if reply.metadata.get("model_id") != model_id:
        return None
    assert runtime.endpoint is not None
    stats = runtime.endpoint.peer_stats(entry.peer_id)
    measured = time.perf_counter() - started
    return stats.srtt_s if stats is not None and stats.srtt_s > 0 else measured


Providers = dict[int, list[ProviderEntry]]  # block -> the workers announcing it


async def lookup_providers(
    runtime: MeshRuntime, model_id: str, num_blocks: int, lookup_retries: int = 3
) -> Providers:
    """Every block's providers from the DHT.

    A lookup that finds no provider for some block is repeated (``lookup_retries`` times, with a growing
    pause): right after a client joins, or while the swarm is busy, DHT replies can be late or lost.
    """
    assert runtime.dht is not None
    for attempt in range(lookup_retries + 1):
        found = await find_block_providers(runtime.dht, model_id, num_blocks)
        providers = by_span(found, num_blocks=num_blocks)
        if all(providers.values()) or attempt == lookup_retries:
            break
        await asyncio.sleep(0.25 * 2**attempt)
        if not runtime.dht.contacts():  # the join itself was lost: join again rather than wait for it
            await runtime.dht.join()
    return providers


class KnownProviders:
    """A client's latest DHT lookup of one model's providers, shared by its sessions.

    A session opened within ``fresh_s`` of it plans over these instead of waiting on a lookup of its
    own (most of a session's opening: 27-50 of 37-62 ms on loopback, docs/benchmarks.md). That is safe
    because planning probes every candidate first (one that died since is banned, not routed to) and a
    route the known providers cannot complete makes the session look up again. Lookups asked for while
    one is under way (``generate_batch`` opening many sessions, a prefetch) share it.
    """

    def __init__(self, model_id: str, num_blocks: int, fresh_s: float = 10.0) -> None:
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.fresh_s = fresh_s
        self._providers: Providers = {}
        self._found_at = -math.inf
        self._lookup: asyncio.Future[Providers] | None = None
        self.lookups = 0  # DHT lookups made (logged, and counted by tests)

    def fresh(self) -> Providers:
        """The providers of the latest lookup that found every block (not to be modified) if it is
        recent enough, else {}."""
        return self._providers if time.monotonic() - self._found_at < self.fresh_s else {}

    async def look_up(self, runtime: MeshRuntime) -> Providers:
        """A new DHT lookup, or the one under way."""
        if self._lookup is None:
            self._lookup = asyncio.ensure_future(self._look_up(runtime))
        return await asyncio.shield(self._lookup)

    async def _look_up(self, runtime: MeshRuntime) -> Providers:
        self.lookups += 1
        try:
            providers = await lookup_providers(runtime, self.model_id, self.num_blocks)
        finally:
            self._lookup = None
        complete = all(providers.values())
        outcome = "every block found" if complete else "blocks missing"
        log.debug("DHT lookup %d of %s: %s", self.lookups, self.model_id, outcome)
        if complete:  # one that misses blocks is no plan for the next session
            self._providers, self._found_at = providers, time.monotonic()
        return providers


def by_span(*found: Providers, num_blocks: int) -> Providers:
    """Each worker listed under every block of its span, the newest entry per worker.

    A worker's signed entry states its whole span, so finding it under one block key is enough: a DHT
    key whose storing nodes lost some entries (nodes die and join) then cannot hide a worker that the
    other keys of its span still list. Also merges several lookups (``found``)."""
    latest: dict[bytes, ProviderEntry] = {}
    for entry in (e for providers in found for block in providers.values() for e in block):
        if entry.peer_id not in latest or entry.seq > latest[entry.peer_id].seq:
            latest[entry.peer_id] = entry
    completed: Providers = {block: [] for block in range(num_blocks)}
    for entry in latest.values():
        for block in entry.blocks:
            if block < num_blocks:
                completed[block].append(entry)
    return completed


async def plan_over(
    runtime: MeshRuntime,
    model_id: str,
    num_blocks: int,
    providers: Providers,
    bans: BanList,
    cache_tokens: int,
    probe_timeout: float = 1.0,
) -> Route:
    """The best chain over those of ``providers`` that are not banned and answer a probe (the others
    are banned). Raises NoRouteError naming the blocks nobody usable serves."""
    entries = {entry.peer_id: entry for block in providers.values() for entry in block}
    banned = bans.banned()
    candidates = [entry for peer, entry in entries.items() if peer not in banned]
    rtts = await asyncio.gather(*(probe(runtime, e, model_id, probe_timeout) for e in candidates))
    client_rtts = {entry.peer_id: rtt for entry, rtt in zip(candidates, rtts, strict=True) if rtt is not None}
    unreachable = {entry.peer_id for entry, rtt in zip(candidates, rtts, strict=True) if rtt is None}
    for peer in unreachable:
        bans.ban(peer, "did not answer a probe")
    return plan_route(
        model_id,
        providers,
        num_blocks,
        client_rtts,
        banned=banned | unreachable,
        cost=CostModel(cache_tokens_needed=cache_tokens),
        whole_spans=True,  # a worker computes its whole span for a session
    )
