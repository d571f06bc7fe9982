"""Route planning on synthetic swarms."""

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from p2p_forge import make_entry

from inferencemesh.p2p.errors import NoRouteError
from inferencemesh.p2p.identity import Identity
from inferencemesh.p2p.records import ProviderEntry
from inferencemesh.p2p.routing import CostModel, plan_route

IDS = [Identity.generate() for _ in range(8)]
INDEX = {identity.peer_id: i for i, identity in enumerate(IDS)}


def worker(i: int, start: int, end: int, *, tps: float = 100.0, total: int = 6, **fields) -> ProviderEntry:
    return make_entry(IDS[i], total=total, start=start, end=end, decode_tps=tps, **fields)


def providers_of(entries: list[ProviderEntry], blocks: int) -> dict[int, list[ProviderEntry]]:
    return {b: [e for e in entries if b in e.blocks] for b in range(blocks)}


def chain(route) -> list[tuple[int, int, int]]:
    return [(INDEX[hop.peer_id], hop.start, hop.end) for hop in route.hops]


def test_one_worker_for_everything_beats_two_halves_when_the_network_costs():
    entries = [worker(0, 0, 6), worker(1, 0, 3), worker(2, 3, 6)]
    route = plan_route("m", providers_of(entries, 6), 6, {IDS[0].peer_id: 0.01, IDS[1].peer_id: 0.01,
                                                           IDS[2].peer_id: 0.01})
    assert chain(route) == [(0, 0, 6)]
    assert route.expected_step_s == pytest.approx(6 / 100 + 0.01)


def test_faster_split_chain_wins_when_compute_dominates():
    entries = [worker(0, 0, 6, tps=10.0), worker(1, 0, 3, rtts={IDS[2].peer_id: 0.002}), worker(2, 3, 6)]
    route = plan_route("m", providers_of(entries, 6), 6, {})
    assert chain(route) == [(1, 0, 3), (2, 3, 6)]
    unknown = CostModel().unknown_rtt_s
    assert route.expected_step_s == pytest.approx(6 / 100 + 0.001 + unknown)


def test_published_worker_rtts_steer_the_choice_of_the_next_hop():
    entries = [
        worker(0, 0, 3, rtts={IDS[1].peer_id: 0.200, IDS[2].peer_id: 0.004}),
        worker(1, 3, 6),
        worker(2, 3, 6),
    ]
    for seed in range(5):
        route = plan_route("m", providers_of(entries, 6), 6, {}, rng=random.Random(seed))
        assert chain(route) == [(0, 0, 3), (2, 3, 6)]


def test_client_rtts_pick_the_nearest_entry_and_exit():
    entries = [worker(0, 0, 6), worker(1, 0, 6)]
    route = plan_route("m", providers_of(entries, 6), 6, {IDS[0].peer_id: 0.3, IDS[1].peer_id: 0.02})
    assert chain(route) == [(1, 0, 6)]


def test_load_makes_a_busy_worker_lose_to_an_idle_one():
    entries = [worker(0, 0, 6, load=3.0), worker(1, 0, 6, tps=50.0)]
    assert chain(plan_route("m", providers_of(entries, 6), 6, {})) == [(1, 0, 6)]


def test_a_worker_lacking_cache_room_is_avoided_but_used_when_it_is_the_only_one():
    cost = CostModel(cache_tokens_needed=2048)
    full, roomy = worker(0, 0, 6, tps=200.0, free_cache_tokens=100), worker(1, 0, 6, free_cache_tokens=4096)
    assert chain(plan_route("m", providers_of([full, roomy], 6), 6, {}, cost=cost)) == [(1, 0, 6)]
    only = plan_route("m", providers_of([full], 6), 6, {}, cost=cost)
    assert chain(only) == [(0, 0, 6)]
    assert only.expected_step_s == pytest.approx(6 / 200 + CostModel().unknown_rtt_s + cost.cache_penalty_s)


def test_ban_list_is_honoured():
    entries = [worker(0, 0, 6, tps=1000.0), worker(1, 0, 6)]
    route = plan_route("m", providers_of(entries, 6), 6, {}, banned={IDS[0].peer_id})
    assert chain(route) == [(1, 0, 6)]


def test_missing_blocks_are_named():
    entries = [worker(0, 0, 2), worker(1, 3, 4), worker(2, 0, 6)]
    with pytest.raises(NoRouteError) as caught:
        plan_route("m", providers_of(entries, 6), 6, {}, banned={IDS[2].peer_id})
    assert caught.value.missing_blocks == [2, 4, 5]
    assert "2, 4-5" in str(caught.value) and "'m'" in str(caught.value)


def test_entries_are_only_used_for_blocks_inside_their_span():
    stray = worker(0, 0, 2)
    with pytest.raises(NoRouteError) as caught:
        plan_route("m", {0: [stray], 1: [stray], 2: [stray]}, 3, {})
    assert caught.value.missing_blocks == [2]


def test_ties_are_broken_at_random_to_spread_load():
    entries = [worker(i, 0, 6) for i in range(3)]
    chosen = {chain(plan_route("m", providers_of(entries, 6), 6, {}, rng=random.Random(seed)))[0][0]
              for seed in range(60)}
    assert chosen == {0, 1, 2}


def _brute_force(entries: list[ProviderEntry], blocks: int, client_rtts: dict, cost: CostModel) -> float:
    """Lowest step cost over every assignment of a provider to each block."""
    options = [[e for e in entries if b in e.blocks] for b in range(blocks)]
    best = float("inf")
    for picks in itertools.product(*options):
        total = client_rtts.get(picks[0].peer_id, cost.unknown_rtt_s) / 2
        for b, entry in enumerate(picks):
            if b == 0 or picks[b - 1].peer_id != entry.peer_id:
                if b > 0:
                    prev = picks[b - 1]
                    rtt = prev.rtts.get(entry.peer_id, entry.rtts.get(prev.peer_id, cost.unknown_rtt_s))
                    total += rtt / 2
                if entry.free_cache_tokens < cost.cache_tokens_needed:
                    total += cost.cache_penalty_s
            total += (1 / entry.decode_tps) * (1 + entry.load)
        total += client_rtts.get(picks[-1].peer_id, cost.unknown_rtt_s) / 2
        best = min(best, total)
    return best


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_planner_finds_the_cheapest_chain_of_a_random_swarm(data):
    blocks = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(1, 5))
    entries = []
    for i in range(n):
        start = data.draw(st.integers(0, blocks - 1))
        end = data.draw(st.integers(start + 1, blocks))
        rtts = {IDS[j].peer_id: data.draw(st.floats(0.001, 0.3)) for j in range(n) if j != i
                and data.draw(st.booleans())}
        entries.append(worker(
            i, start, end, total=blocks, tps=data.draw(st.floats(5, 500)), load=data.draw(st.floats(0, 2)),
            free_cache_tokens=data.draw(st.integers(0, 4096)), rtts=rtts,
        ))
    client_rtts = {
        IDS[i].peer_id: data.draw(st.floats(0.001, 0.3)) for i in range(n) if data.draw(st.booleans())
    }
    cost = CostModel(cache_tokens_needed=data.draw(st.integers(0, 4096)))
    providers = providers_of(entries, blocks)
    if any(not providers[b] for b in range(blocks)):
        with pytest.raises(NoRouteError):
            plan_route("m", providers, blocks, client_rtts, cost=cost)
        return
    route = plan_route("m", providers, blocks, client_rtts, cost=cost)
    assert route.expected_step_s == pytest.approx(_brute_force(entries, blocks, client_rtts, cost))
    assert route.hops[0].start == 0 and route.hops[-1].end == blocks
    assert all(a.end == b.start for a, b in itertools.pairwise(route.hops))
    assert all(h.entry.span_start <= h.start and h.end <= h.entry.span_end for h in route.hops)


def test_whole_spans_only_switch_workers_at_span_boundaries():
    # Overlapping spans: 0-4 on a fast worker, 2-6 on another. A split route would run 0-2 on the
    # first and 2-6 on the second; workers that compute whole spans cannot do that.
    entries = [worker(0, 0, 4, tps=1000.0), worker(1, 2, 6, tps=1000.0), worker(2, 0, 6, tps=10.0)]
    split = plan_route("m", providers_of(entries, 6), 6, {})
    assert any((h.start, h.end) != (h.entry.span_start, h.entry.span_end) for h in split.hops)
    whole = plan_route("m", providers_of(entries, 6), 6, {}, whole_spans=True)
    assert chain(whole) == [(2, 0, 6)]
    with pytest.raises(NoRouteError) as caught:
        plan_route("m", providers_of(entries[:2], 6), 6, {}, whole_spans=True)
    assert caught.value.missing_blocks == [4, 5]


def test_whole_spans_chain_aligned_spans():
    entries = [worker(0, 0, 2), worker(1, 2, 4), worker(2, 4, 6), worker(3, 2, 4, tps=1.0)]
    route = plan_route("m", providers_of(entries, 6), 6, {}, whole_spans=True)
    assert chain(route) == [(0, 0, 2), (1, 2, 4), (2, 4, 6)]
    for hop in route.hops:
        assert (hop.start, hop.end) == (hop.entry.span_start, hop.entry.span_end)
