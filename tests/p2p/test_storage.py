"""RecordStorage: the storing node's rules. Each of these fails on kademlia's ForgetfulStorage."""

import time

import msgpack
import pytest
from p2p_forge import claiming_peer, make_entry, signed, with_bad_signature

from inferencemesh.p2p.errors import RecordError
from inferencemesh.p2p.identity import Identity
from inferencemesh.p2p.records import MODELS_KEY, block_key, decode_entry, dht_key, sign_entry
from inferencemesh.p2p.storage import RecordStorage

KEY = dht_key(block_key("m", 0))


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def peers_under(storage: RecordStorage, key: bytes = KEY) -> set[bytes]:
    return {e.peer_id for e in storage.entries(key) if not e.withdrawn}


def test_stores_of_different_peers_merge_instead_of_overwriting():
    storage = RecordStorage()
    workers = [Identity.generate() for _ in range(10)]
    for worker in workers:
        storage[KEY] = signed(worker, model="m")
    assert peers_under(storage) == {w.peer_id for w in workers}
    returned = [decode_entry(w).peer_id for w in msgpack.unpackb(storage.get(KEY))]
    assert sorted(returned) == sorted(w.peer_id for w in workers)


def test_newer_seq_replaces_and_older_or_conflicting_equal_seq_is_refused():
    storage, alice = RecordStorage(), Identity.generate()
    old, new = signed(alice, model="m", seq=1), signed(alice, model="m", seq=2)
    storage.store(KEY, old)
    storage.store(KEY, new)
    storage.store(KEY, new)  # a retried store of the same bytes is fine
    with pytest.raises(RecordError, match="stale seq"):
        storage.store(KEY, old)
    with pytest.raises(RecordError, match="stale seq"):
        storage.store(KEY, signed(alice, model="m", seq=2, load=3.0))
    assert [e.seq for e in storage.entries(KEY)] == [2]


def test_withdrawal_replaces_the_entry_and_blocks_its_replay():
    storage, alice, bob = RecordStorage(), Identity.generate(), Identity.generate()
    live = signed(alice, model="m", seq=5)
    storage.store(KEY, live)
    storage.store(KEY, signed(bob, model="m"))
    storage.store(KEY, signed(alice, model="m", seq=6, withdrawn=True))
    assert peers_under(storage) == {bob.peer_id}
    with pytest.raises(RecordError, match="stale seq"):
        storage.store(KEY, live)


def test_nobody_can_remove_or_overwrite_another_peer_s_entry():
    storage, alice, mallory = RecordStorage(), Identity.generate(), Identity.generate()
    storage.store(KEY, signed(alice, model="m"))
    victim = storage.entries(KEY)[0]
    forgeries = [
        with_bad_signature(signed(alice, model="m", seq=99, withdrawn=True)),
        claiming_peer(victim, mallory),
        b"garbage",
        msgpack.packb([]),
    ]
    for wire in forgeries:
        with pytest.raises(RecordError):
            storage.store(KEY, wire)
    assert storage.entries(KEY) == [victim]


def test_entry_is_accepted_only_under_its_own_keys():
    storage, alice = RecordStorage(), Identity.generate()
    wire = signed(alice, model="m", start=2, end=4)
    for name in [block_key("m", 2), block_key("m", 3), MODELS_KEY]:
        storage.store(dht_key(name), wire)
    for name in [block_key("m", 4), block_key("m", 1), block_key("other", 2)]:
        with pytest.raises(RecordError, match="does not belong"):
            storage.store(dht_key(name), wire)


def test_expired_entries_vanish_on_read_and_write_and_nothing_is_republished():
    clock = Clock()
    storage = RecordStorage(clock=clock)
    alice, bob = Identity.generate(), Identity.generate()
    storage.store(KEY, signed(alice, model="m", ttl=5))
    storage.store(KEY, signed(bob, model="m", ttl=50))
    assert storage.iter_older_than(0) == []  # holders never republish (stock: hourly, forever)
    clock.now += 10
    assert peers_under(storage) == {bob.peer_id}
    assert list(storage) == [(KEY, msgpack.unpackb(storage.get(KEY))[0])]
    clock.now += 100
    assert storage.get(KEY) is None
    with pytest.raises(KeyError):
        storage[KEY]
    with pytest.raises(RecordError, match="expired"):
        storage.store(KEY, signed(alice, model="m", seq=9, ttl=5))


def test_entries_expiring_too_far_ahead_are_refused():
    storage = RecordStorage(max_ttl=120)
    with pytest.raises(RecordError, match="ahead"):
        storage.store(KEY, signed(Identity.generate(), model="m", ttl=3600))


def test_a_full_key_evicts_the_entry_expiring_first_or_refuses():
    storage = RecordStorage(max_entries_per_key=3)
    first, *rest = [Identity.generate() for _ in range(3)]
    storage.store(KEY, signed(first, model="m", ttl=10))
    for worker in rest:
        storage.store(KEY, signed(worker, model="m", ttl=60))
    newcomer = Identity.generate()
    storage.store(KEY, signed(newcomer, model="m", ttl=30))
    assert peers_under(storage) == {newcomer.peer_id, *(w.peer_id for w in rest)}
    with pytest.raises(RecordError, match="full"):
        storage.store(KEY, signed(Identity.generate(), model="m", ttl=20))


def test_a_read_fits_the_byte_budget_latest_expiry_first():
    storage = RecordStorage(max_value_bytes=3000)
    workers = [Identity.generate() for _ in range(20)]
    for i, worker in enumerate(workers):
        storage.store(KEY, sign_entry(make_entry(worker, model="m", ttl=30 + i), worker))
    value = storage.get(KEY)
    assert len(value) <= 3000
    returned = [decode_entry(w).peer_id for w in msgpack.unpackb(value)]
    assert 0 < len(returned) < 20
    assert returned == [w.peer_id for w in reversed(workers)][: len(returned)]
