"""Choosing the chain of workers for a session: DHT lookup, RTT probes, the planner, a ban list."""

from __future__ import annotations

import asyncio
import logging
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


async def find_route(
    runtime: MeshRuntime,
    model_id: str,
    num_blocks: int,
    bans: BanList,
    *,
    cache_tokens: int,
    probe_timeout: float = 1.0,
    lookup_retries: int = 3,
) -> Route:
    """The best chain over live workers. Raises NoRouteError naming the blocks nobody usable serves.

    A lookup that finds no provider for some block is repeated (``lookup_retries`` times, with a growing
    pause): right after a client joins, or while the swarm is busy, DHT replies can be late or lost.
    """
    assert runtime.dht is not None
    for attempt in range(lookup_retries + 1):
        providers = await find_block_providers(runtime.dht, model_id, num_blocks)
        if all(providers.values()) or attempt == lookup_retries:
            break
        await asyncio.sleep(0.25 * 2**attempt)
        if not runtime.dht.contacts():  # the join itself was lost: join again rather than wait for it
            await runtime.dht.join()
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
