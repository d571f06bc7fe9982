"""Ways an attacker can forge provider entries, shared by the storage, client and swarm tests."""

from __future__ import annotations

import dataclasses
import time

import msgpack

from inferencemesh.p2p import records
from inferencemesh.p2p.identity import Identity
from inferencemesh.p2p.records import ProviderEntry, sign_entry


def make_entry(identity: Identity, *, model: str = "m", total: int = 30, start: int = 0, end: int = 30,
               seq: int = 1, ttl: float = 60.0, withdrawn: bool = False, **fields: object) -> ProviderEntry:
    values: dict = dict(
        model_id=model, total_blocks=total, span_start=start, span_end=end, peer_id=identity.peer_id,
        public_key=identity.public_key, addresses=("127.0.0.1:7001",), dtype="float32", decode_tps=100.0,
        prefill_tps=1000.0, free_cache_tokens=4096, load=0.0, seq=seq, expiry=time.time() + ttl,
        withdrawn=withdrawn,
    )
    values.update(fields)
    return ProviderEntry(**values)


def signed(identity: Identity, **fields: object) -> bytes:
    return sign_entry(make_entry(identity, **fields), identity)


def sign_unchecked(entry: ProviderEntry, signer: Identity) -> bytes:
    """Encode and sign ``entry`` with ``signer`` without the checks ``sign_entry`` makes (an attacker's
    encoder), e.g. to claim another peer's id."""
    fields = [records._to_wire(name, getattr(entry, name)) for name in records._FIELDS]
    payload = msgpack.packb([records._VERSION, *fields])
    return msgpack.packb([payload, signer.sign(records._DOMAIN + payload)])


def with_bad_signature(wire: bytes) -> bytes:
    payload, signature = msgpack.unpackb(wire)
    return msgpack.packb([payload, signature[:-1] + bytes([signature[-1] ^ 1])])


def claiming_peer(victim: ProviderEntry, attacker: Identity) -> bytes:
    """The victim's entry re-signed by the attacker: the attacker's key under the victim's peer id."""
    forged = dataclasses.replace(victim, public_key=attacker.public_key, addresses=("10.6.6.6:1",),
                                 seq=victim.seq + 1000)
    return sign_unchecked(forged, attacker)
