"""Provider lists under churn: a worker found under one block key is a candidate for its whole span."""

from __future__ import annotations

from inferencemesh.client.route import Providers, by_span
from inferencemesh.p2p.identity import Identity
from inferencemesh.p2p.records import ProviderEntry


def entry(identity: Identity, start: int, end: int, seq: int = 1) -> ProviderEntry:
    return ProviderEntry(
        model_id="m",
        total_blocks=6,
        span_start=start,
        span_end=end,
        peer_id=identity.peer_id,
        public_key=identity.public_key,
        addresses=("127.0.0.1:4001",),
        dtype="float32",
        decode_tps=100.0,
        prefill_tps=1000.0,
        free_cache_tokens=4096,
        load=0.0,
        seq=seq,
        expiry=2e9,
    )


def peers(providers: Providers) -> dict[int, set[bytes]]:
    return {block: {e.peer_id for e in entries} for block, entries in providers.items()}


def test_a_worker_found_under_one_block_covers_its_whole_span() -> None:
    a, b = Identity.generate(), Identity.generate()
    first, second = entry(a, 0, 3), entry(b, 3, 6)
    partial = {0: [], 1: [first], 2: [], 3: [second], 4: [], 5: []}
    expected = {block: {a.peer_id} for block in range(3)} | {block: {b.peer_id} for block in range(3, 6)}
    assert peers(by_span(partial, num_blocks=6)) == expected


def test_merging_lookups_keeps_every_worker_once_with_its_newest_entry() -> None:
    a, b = Identity.generate(), Identity.generate()
    old_a, new_a, only_b = entry(a, 0, 2, seq=1), entry(a, 0, 2, seq=5), entry(b, 0, 2)
    merged = by_span({0: [old_a], 1: []}, {0: [new_a, only_b], 1: [new_a]}, num_blocks=2)
    assert peers(merged) == {0: {a.peer_id, b.peer_id}, 1: {a.peer_id, b.peer_id}}
    assert all(e.seq == 5 for block in merged.values() for e in block if e.peer_id == a.peer_id)


def test_blocks_nobody_serves_stay_empty_and_spans_past_the_model_are_cut() -> None:
    a = Identity.generate()
    assert peers(by_span({0: [entry(a, 1, 6)], 1: []}, num_blocks=2)) == {0: set(), 1: {a.peer_id}}
