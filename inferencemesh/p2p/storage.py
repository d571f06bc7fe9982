"""What a storing DHT node keeps: verified provider entries, merged per peer, until their expiry.

This replaces kademlia's ``ForgetfulStorage`` (plugged in through its ``IStorage`` interface), whose
semantics lose data in a swarm: one value per key that every ``set`` overwrites, and hourly
republishing that keeps dead workers' records alive forever. Here:

- a key holds one entry per peer; a store replaces that peer's entry only with a higher ``seq``,
  so concurrent announces of different workers never erase each other, and nobody but the peer
  itself (who alone can sign) can replace or remove its entry;
- every entry is verified (schema, key-to-peer-id binding, signature, and that the DHT key is one
  of the entry's keys) before it is kept;
- expired entries are dropped on every read and write, and entries whose expiry lies more than
  ``max_ttl`` ahead are refused, so a publisher cannot pin an entry for long;
- holders never republish (``iter_older_than`` is empty): an entry lives only while its publisher
  refreshes it;
- a key holds at most ``max_entries_per_key`` entries and a read returns at most
  ``max_value_bytes``, keeping every reply inside one UDP datagram.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import msgpack
from kademlia.storage import IStorage

from inferencemesh.p2p.errors import RecordError
from inferencemesh.p2p.records import MAX_ENTRY_BYTES, EntryCache, ProviderEntry

DEFAULT_MAX_TTL = 600.0
DEFAULT_MAX_ENTRIES_PER_KEY = 64
DEFAULT_MAX_VALUE_BYTES = 32_000


class RecordStorage(IStorage):
    def __init__(
        self,
        *,
        max_ttl: float = DEFAULT_MAX_TTL,
        max_entries_per_key: int = DEFAULT_MAX_ENTRIES_PER_KEY,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        clock: Callable[[], float] = time.time,
        cache: EntryCache | None = None,
    ) -> None:
        if max_value_bytes < MAX_ENTRY_BYTES + 16:
            raise ValueError(f"max_value_bytes must hold at least one entry ({MAX_ENTRY_BYTES} bytes)")
        self.max_ttl = max_ttl
        self.max_entries_per_key = max_entries_per_key
        self.max_value_bytes = max_value_bytes
        self._clock = clock
        self._cache = cache or EntryCache()
        # DHT key -> peer id -> (entry, its signed wire bytes)
        self._keys: dict[bytes, dict[bytes, tuple[ProviderEntry, bytes]]] = {}

    def store(self, dkey: bytes, wire: bytes) -> ProviderEntry:
        """Verify and merge one signed entry under ``dkey``; raises :class:`RecordError` if refused."""
        entry = self._cache.decode(wire)
        if dkey not in entry.dht_keys:
            raise RecordError(f"entry of peer {entry.peer_id.hex()[:12]} does not belong under this key")
        now = self._clock()
        if entry.is_expired(now):
            raise RecordError("entry has expired")
        if entry.expiry > now + self.max_ttl:
            raise RecordError(f"entry expires more than {self.max_ttl:.0f} s ahead")
        peers = self._live_peers(dkey, now)
        current = peers.get(entry.peer_id)
        if current is not None:
            if current[1] == wire:
                return entry  # the same announce again (a retried store): nothing changes
            if current[0].seq >= entry.seq:
                raise RecordError(
                    f"stale seq {entry.seq} for peer {entry.peer_id.hex()[:12]} (holding {current[0].seq})"
                )
        elif len(peers) >= self.max_entries_per_key:
            self._evict_for(peers, entry)
        peers[entry.peer_id] = (entry, wire)
        self._keys[dkey] = peers
        return entry

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        """The entries under ``key`` as a msgpack list of wire entries, latest expiry first."""
        peers = self._live_peers(key, self._clock())
        if not peers:
            return default
        chosen: list[bytes] = []
        size = 0
        for _, wire in sorted(peers.values(), key=lambda item: -item[0].expiry):
            size += len(wire) + 3  # msgpack bin header of an entry
            if size > self.max_value_bytes:
                break
            chosen.append(wire)
        return msgpack.packb(chosen)

    def entries(self, key: bytes) -> list[ProviderEntry]:
        """Live entries under ``key`` (tombstones included), for inspection and tests."""
        return [entry for entry, _ in self._live_peers(key, self._clock()).values()]

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.store(key, value)

    def __getitem__(self, key: bytes) -> bytes:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        # Holders never republish: an entry lives only as long as its publisher keeps refreshing it.
        return []

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        """Every live (DHT key, wire entry) pair, one per entry: what a node hands to a closer newcomer."""
        now = self._clock()
        for dkey in list(self._keys):
            for _, wire in list(self._live_peers(dkey, now).values()):
                yield dkey, wire

    def _live_peers(self, dkey: bytes, now: float) -> dict[bytes, tuple[ProviderEntry, bytes]]:
        peers = self._keys.get(dkey)
        if peers is None:
            return {}
        live = {peer: item for peer, item in peers.items() if not item[0].is_expired(now)}
        if live:
            self._keys[dkey] = live
        else:
            del self._keys[dkey]
        return live

    def _evict_for(self, peers: dict[bytes, tuple[ProviderEntry, bytes]], entry: ProviderEntry) -> None:
        """Make room in a full key by dropping the entry expiring first, if it expires before ``entry``."""
        victim, (victim_entry, _) = min(peers.items(), key=lambda item: item[1][0].expiry)
        if victim_entry.expiry >= entry.expiry:
            raise RecordError(f"key is full ({self.max_entries_per_key} entries)")
        del peers[victim]
