"""Route planning: which chain of workers a client sends one decode step through.

A pure function over provider entries and RTTs (no networking), so it is tested on synthetic swarms.

The chain is a shortest path over the nodes (block b, peer p) = "p computes block b":

- computing block b on p costs ``(1 / p.decode_tps) * (1 + p.load)`` (entries announce per-block
  throughput; a worker that announced none is assumed to take ``CostModel.unknown_block_s``);
- staying on the same peer from block b to b+1 costs nothing extra; moving from q to p costs the
  one-way network time RTT(q, p) / 2, from the RTT q or p measured to the other (as published in
  their entries), else ``CostModel.unknown_rtt_s``;
- the client sends to the first peer and the last peer answers the client: half of the client's
  measured RTT each way;
- entering a peer whose free cache is below ``CostModel.cache_tokens_needed`` costs
  ``CostModel.cache_penalty_s``, so such a peer is used only when it is clearly better otherwise.

Since the graph is layered by block, the shortest path is one dynamic-programming pass. Equal-cost
alternatives are picked at random, spreading clients over equally good workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from inferencemesh.p2p.errors import NoRouteError
from inferencemesh.p2p.records import ProviderEntry

_TIE = 1e-9  # relative tolerance under which two path costs count as equal


@dataclass(frozen=True)
class CostModel:
    unknown_rtt_s: float = 0.1  # RTT assumed where nobody measured one
    unknown_block_s: float = 0.05  # per-block compute time of a worker that announced no throughput
    cache_tokens_needed: int = 0  # KV cache tokens the session needs on each worker
    cache_penalty_s: float = 1.0  # added for entering a worker that lacks that cache room


@dataclass(frozen=True)
class Hop:
    entry: ProviderEntry
    start: int  # first block this hop computes (0-based)
    end: int  # one past the last block (half-open, like the spans)

    @property
    def peer_id(self) -> bytes:
        return self.entry.peer_id


@dataclass(frozen=True)
class Route:
    hops: list[Hop]
    expected_step_s: float


def plan_route(
    model_id: str,
    providers: Mapping[int, Sequence[ProviderEntry]],
    num_blocks: int,
    client_rtts: Mapping[bytes, float],
    *,
    banned: Collection[bytes] = (),
    cost: CostModel | None = None,
    rng: random.Random | None = None,
    whole_spans: bool = False,
) -> Route:
    """The chain with the lowest expected decode-step latency covering blocks ``0 .. num_blocks-1``.

    ``providers`` maps each block to the entries serving it (as :func:`find_block_providers`
    returns), ``client_rtts`` the client's measured RTTs in seconds by peer id, and ``banned`` peer
    ids never to use. With ``whole_spans``, every hop runs a worker's entire announced span (a chain
    may only pass from one worker to the next where the first one's span ends and the next one's
    begins), which is what workers that compute their span as one unit need. Raises
    :class:`NoRouteError` naming the blocks no usable peer serves (or, with ``whole_spans``, the first
    blocks that no chain of whole spans reaches).
    """
    cost = cost or CostModel()
    rng = rng or random.Random()
    usable = _usable_providers(providers, num_blocks, banned)
    missing = [block for block, entries in enumerate(usable) if not entries]
    if missing:
        raise NoRouteError(model_id, missing)

    costs = _Costs(cost, client_rtts)
    # best[b][peer] = lowest cost from the client's send to block b done on peer;
    # came_from[b][peer] = the peers at block b-1 (None = the client) that reach it at that cost.
    best: list[dict[bytes, float]] = []
    came_from: list[dict[bytes, list[bytes | None]]] = []
    for block, entries in enumerate(usable):
        best.append({})
        came_from.append({})
        for peer in entries.values():
            if block == 0:
                options: list[tuple[float, bytes | None]] = [(costs.first_leg(peer), None)]
            else:
                options = [
                    (previous_cost + costs.transfer(usable[block - 1][prev_id], peer, block), prev_id)
                    for prev_id, previous_cost in best[block - 1].items()
                    if not whole_spans or _can_follow(usable[block - 1][prev_id], peer, block)
                ]
            if not options:
                continue
            lowest = min(c for c, _ in options)
            best[block][peer.peer_id] = lowest + costs.compute(peer)
            came_from[block][peer.peer_id] = [p for c, p in options if _equal(c, lowest)]

    unreachable = [block for block, reached in enumerate(best) if not reached]
    if unreachable:
        raise NoRouteError(model_id, unreachable)
    last = usable[-1]
    totals = {peer_id: c + costs.last_leg(last[peer_id]) for peer_id, c in best[-1].items()}
    lowest_total = min(totals.values())
    peer_id: bytes | None = rng.choice([p for p, c in totals.items() if _equal(c, lowest_total)])
    chosen: list[bytes] = []
    for block in range(num_blocks - 1, -1, -1):
        assert peer_id is not None
        chosen.append(peer_id)
        peer_id = rng.choice(came_from[block][peer_id])
    chosen.reverse()
    return Route(_hops(chosen, usable), lowest_total)


def _can_follow(previous: ProviderEntry, peer: ProviderEntry, block: int) -> bool:
    """Whole spans: stay on the same worker, or switch exactly at a span boundary."""
    if previous.peer_id == peer.peer_id:
        return True
    return previous.span_end == block and peer.span_start == block


def _usable_providers(
    providers: Mapping[int, Sequence[ProviderEntry]], num_blocks: int, banned: Collection[bytes]
) -> list[dict[bytes, ProviderEntry]]:
    """Per block, the providers by peer id that are not banned and whose span really holds the block."""
    banned = set(banned)
    return [
        {e.peer_id: e for e in providers.get(block, ()) if e.peer_id not in banned and block in e.blocks}
        for block in range(num_blocks)
    ]


class _Costs:
    """The edge costs of the route graph (see the module docstring)."""

    def __init__(self, model: CostModel, client_rtts: Mapping[bytes, float]) -> None:
        self.model = model
        self.client_rtts = client_rtts

    def first_leg(self, peer: ProviderEntry) -> float:
        return self.last_leg(peer) + self._entering(peer)

    def last_leg(self, peer: ProviderEntry) -> float:
        return self.client_rtts.get(peer.peer_id, self.model.unknown_rtt_s) / 2

    def transfer(self, previous: ProviderEntry, peer: ProviderEntry, block: int) -> float:
        if previous.peer_id == peer.peer_id and block - 1 in peer.blocks:
            return 0.0  # the same worker goes on to its next block: no network, no new session
        rtt = previous.rtts.get(peer.peer_id, peer.rtts.get(previous.peer_id, self.model.unknown_rtt_s))
        return rtt / 2 + self._entering(peer)

    def compute(self, peer: ProviderEntry) -> float:
        per_block = 1.0 / peer.decode_tps if peer.decode_tps > 0 else self.model.unknown_block_s
        return per_block * (1.0 + peer.load)

    def _entering(self, peer: ProviderEntry) -> float:
        lacks_cache = peer.free_cache_tokens < self.model.cache_tokens_needed
        return self.model.cache_penalty_s if lacks_cache else 0.0


def _equal(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_TIE, abs_tol=1e-15)


def _hops(chosen: list[bytes], usable: list[dict[bytes, ProviderEntry]]) -> list[Hop]:
    """Collapse the per-block choice into runs of consecutive blocks on the same peer."""
    hops: list[Hop] = []
    start = 0
    for block in range(1, len(chosen) + 1):
        if block == len(chosen) or chosen[block] != chosen[start]:
            hops.append(Hop(usable[start][chosen[start]], start, block))
            start = block
    return hops
