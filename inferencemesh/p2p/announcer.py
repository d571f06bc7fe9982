"""Keeps a worker's provider entry published while it runs, and withdraws it when it stops.

The entry is re-signed with a new ``seq`` and expiry and stored under all its keys (every block of
the span, the model directory, the models index) at start, then every third of the TTL, so it
survives two missed refreshes. Storing nodes never republish, so a worker that dies disappears at
most one TTL later; one that stops cleanly publishes a withdrawal (a tombstone with a newer seq)
that replaces its entry everywhere at once.

A key whose closest nodes did not all answer the store (busy, a lost reply, backed off after one) is
stored again after 2, 4, 8... seconds (doubling from the DHT's back-off, so the nodes that timed out
are asked again) until they all have it or the next publish replaces the entry: a lookup reads the
first holders that answer, and one that missed the entry would hide this worker from it until then.
A withdrawal is stored again the same way for as long as :meth:`Announcer.stop` is given: a node
that missed it would keep offering the stopped worker to clients until the old entry expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from inferencemesh.p2p.identity import Identity
from inferencemesh.p2p.node import DHTNode, StoreResult
from inferencemesh.p2p.records import MAX_RTTS, ProviderEntry, sign_entry

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0


@dataclass(frozen=True)
class AnnounceReport:
    accepted: dict[str, int]  # key name -> how many nodes stored the entry
    seconds: float
    unreached: dict[str, int] = field(default_factory=dict)  # key name -> closest nodes that missed it

    @classmethod
    def of(cls, results: dict[str, StoreResult], seconds: float) -> AnnounceReport:
        accepted = {key: result.accepted for key, result in results.items()}
        unreached = {key: result.unreached for key, result in results.items() if result.unreached}
        return cls(accepted, seconds, unreached)

    @property
    def failed_keys(self) -> list[str]:
        return [key for key, count in self.accepted.items() if count == 0]

    @property
    def keys_to_repair(self) -> list[str]:
        """Keys stored nowhere or missed by some of their closest nodes."""
        return [key for key, count in self.accepted.items() if count == 0 or key in self.unreached]


class Announcer:
    """Publishes one worker's entry for a span of a model.

    The dynamic fields (throughputs, free cache, load, RTTs) change through :meth:`update`; they go
    out with the next refresh, or at once with :meth:`publish`.
    """

    def __init__(
        self,
        node: DHTNode,
        identity: Identity,
        *,
        model_id: str,
        total_blocks: int,
        span_start: int,
        span_end: int,
        addresses: list[str],
        dtype: str,
        decode_tps: float = 0.0,
        prefill_tps: float = 0.0,
        free_cache_tokens: int = 0,
        load: float = 0.0,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        self.node = node
        self.identity = identity
        self.ttl = ttl
        self._entry = ProviderEntry(
            model_id=model_id,
            total_blocks=total_blocks,
            span_start=span_start,
            span_end=span_end,
            peer_id=identity.peer_id,
            public_key=identity.public_key,
            addresses=tuple(addresses),
            dtype=dtype,
            decode_tps=float(decode_tps),
            prefill_tps=float(prefill_tps),
            free_cache_tokens=free_cache_tokens,
            load=float(load),
            seq=0,
            expiry=0.0,
        )
        sign_entry(self._entry, identity)  # reject bad fields here, not in the refresh loop
        self._refresher: asyncio.Task[None] | None = None
        self._repairer: asyncio.Task[None] | None = None
        self._publishing = asyncio.Lock()
        self._published_at = 0.0  # time.monotonic() when the last publish began

    @property
    def entry(self) -> ProviderEntry:
        """The entry as last published (or as it will be first published)."""
        return self._entry

    async def start(self) -> AnnounceReport:
        """Publish now, then keep refreshing every third of the TTL until :meth:`stop`."""
        report = await self.publish()
        self._refresher = asyncio.ensure_future(self._refresh_forever())
        return report

    def update(
        self,
        *,
        decode_tps: float | None = None,
        prefill_tps: float | None = None,
        free_cache_tokens: int | None = None,
        load: float | None = None,
        rtts: dict[bytes, float] | None = None,
    ) -> None:
        """Change the dynamic fields. ``rtts`` keeps only the :data:`MAX_RTTS` nearest neighbours."""
        changes: dict[str, object] = {}
        if decode_tps is not None:
            changes["decode_tps"] = float(decode_tps)
        if prefill_tps is not None:
            changes["prefill_tps"] = float(prefill_tps)
        if free_cache_tokens is not None:
            changes["free_cache_tokens"] = free_cache_tokens
        if load is not None:
            changes["load"] = float(load)
        if rtts is not None:
            changes["rtts"] = dict(sorted(rtts.items(), key=lambda item: item[1])[:MAX_RTTS])
        updated = dataclasses.replace(self._entry, **changes)
        sign_entry(updated, self.identity)  # raises RecordError on a bad value
        self._entry = updated

    async def publish(self, *, withdrawn: bool = False) -> AnnounceReport:
        """Sign the entry with a new seq and expiry and store it under all its keys."""
        async with self._publishing:
            await self._stop_repairs()  # they re-store the entry this publish replaces
            started = self._published_at = time.monotonic()
            now = time.time()
            # Microseconds since the epoch: a restarted worker's seq is above its previous life's.
            seq = max(self._entry.seq + 1, time.time_ns() // 1000)
            self._entry = dataclasses.replace(
                self._entry, seq=seq, expiry=now + self.ttl, withdrawn=withdrawn
            )
            wire = sign_entry(self._entry, self.identity)
            results = await self._store(self._entry.key_names, wire)
            retry = [key for key, result in results.items() if result.accepted == 0]
            if retry:  # one more try for keys no node took (lost datagrams, a stale routing table)
                results.update(await self._store(retry, wire))
            report = AnnounceReport.of(results, time.monotonic() - started)
            if report.keys_to_repair:
                self._repairer = asyncio.ensure_future(self._repair(report.keys_to_repair, wire))
        log.debug(
            "published seq %d of %s in %.2f s: %d keys, %d stored nowhere, %d to repair",
            self._entry.seq,
            self._entry.model_id,
            report.seconds,
            len(report.accepted),
            len(report.failed_keys),
            len(report.keys_to_repair),
        )
        if report.failed_keys:
            log.warning(
                "announce of %s blocks %d-%d: %d of %d keys stored nowhere",
                self._entry.model_id,
                self._entry.span_start,
                self._entry.span_end - 1,
                len(report.failed_keys),
                len(report.accepted),
            )
        return report

    async def settled(self) -> None:
        """Wait until the repairs of the last publish are done (at once when it needed none)."""
        while True:
            async with self._publishing:  # a publish under way decides whether repairs follow
                repairer = self._repairer
            if repairer is None:
                return
            await asyncio.gather(repairer, return_exceptions=True)
            if repairer is self._repairer:  # finished, not cancelled by a newer publish
                return

    async def stop(self, settle_within: float = 0.0) -> AnnounceReport:
        """Stop refreshing and publish a withdrawal, so storing nodes drop the entry now.

        Keys that some closest node missed are stored again for up to ``settle_within`` seconds;
        nodes still missing the withdrawal then keep the old entry until it expires (at most a TTL).
        Nothing runs in the background once this returns.
        """
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        report = await self.publish(withdrawn=True)
        try:
            if report.keys_to_repair and settle_within > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.settled(), timeout=settle_within)
        finally:
            await self._stop_repairs()
        return report

    async def _store(self, keys: list[str], wire: bytes) -> dict[str, StoreResult]:
        results = await asyncio.gather(*(self.node.store_entry(key, wire) for key in keys))
        return dict(zip(keys, results, strict=True))

    async def _repair(self, keys: list[str], wire: bytes) -> None:
        delay = self.node.config.backoff_base
        waited = 0.0
        while keys and waited + delay < self.ttl:  # a refresh replaces it sooner; the TTL bounds it
            await asyncio.sleep(delay)
            waited += delay
            delay *= 2
            report = AnnounceReport.of(await self._store(keys, wire), 0.0)
            log.debug("re-stored %d keys; %d still short", len(keys), len(report.keys_to_repair))
            keys = report.keys_to_repair

    async def _stop_repairs(self) -> None:
        if self._repairer is not None:
            self._repairer.cancel()
            await asyncio.gather(self._repairer, return_exceptions=True)
            self._repairer = None

    async def _refresh_forever(self) -> None:
        # Every third of the TTL from the last publish's start, not its end: a publish slowed by
        # timeouts must not push the next one toward the expiry of the entry it replaces.
        while True:
            await asyncio.sleep(max(0.0, self._published_at + self.ttl / 3 - time.monotonic()))
            await self.publish()
