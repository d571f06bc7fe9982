"""Signed provider entries: what a worker tells the DHT about itself, and how that is checked.

One :class:`ProviderEntry` says "peer P serves blocks [span_start, span_end) of model M, here is how
to reach it and how fast it is". Blocks are 0-based and the span is half-open, so a worker serving
the first ten blocks of a 30-block model has ``span_start=0, span_end=10``.

The same signed bytes are stored under several DHT keys: the key of every block in the span, the
model's directory key (all workers of one model) and the global models key (which models exist).
A storing node accepts the bytes under a key only when that key is one of the entry's keys, so an
entry cannot be replayed under a block it does not serve. Signing once per announce also means a
client verifies each worker's signature once per lookup, not once per block.

Wire form: ``msgpack([payload, signature])`` where ``payload`` is the msgpack array of the fields in
:data:`_FIELDS` order and ``signature`` is Ed25519 over ``_DOMAIN + payload``. Because the signature
covers the exact payload bytes, decoding never needs to re-encode anything.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import msgpack

from inferencemesh.p2p.address import parse_host_port
from inferencemesh.p2p.errors import AddressError, RecordError
from inferencemesh.p2p.identity import (
    PEER_ID_BYTES,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    peer_id_of,
    verify_signature,
)

_VERSION = 1
_DOMAIN = b"inferencemesh/provider-entry/v1\x00"
_KEY_PREFIX = "inferencemesh/v1"
MODELS_KEY = f"{_KEY_PREFIX}/models"

# The schema limits below keep every valid entry under this (tests/p2p check the largest one), so only
# decoding needs to enforce it.
MAX_ENTRY_BYTES = 2560
MAX_MODEL_ID_CHARS = 128
MAX_BLOCKS = 1024
MAX_ADDRESSES = 8
MAX_ADDRESS_CHARS = 80
MAX_DTYPE_CHARS = 16
MAX_RTTS = 24
MAX_SEQ = 2**63 - 1


def block_key(model_id: str, block: int) -> str:
    return f"{_KEY_PREFIX}/block/{model_id}/{block}"


def model_directory_key(model_id: str) -> str:
    return f"{_KEY_PREFIX}/model/{model_id}"


def dht_key(name: str) -> bytes:
    """The 160-bit kademlia key of a key name."""
    return hashlib.sha1(name.encode()).digest()


@dataclass(frozen=True)
class ProviderEntry:
    """One worker's statement about the span of a model it serves (see the module docstring).

    Throughputs are per block: tokens per second one block of this worker sustains while decoding
    (one token per sequence) and while prefilling. ``load`` is the worker's queue depth relative to
    its capacity (0 = idle, 1 = every slot busy, above 1 = requests wait). ``rtts`` maps neighbour
    peer ids to round-trip times in seconds that this worker measured. ``expiry`` is absolute unix
    time. A ``withdrawn`` entry is a tombstone: the worker left, and its newer ``seq`` supersedes
    the entries it published before.
    """

    model_id: str
    total_blocks: int
    span_start: int
    span_end: int
    peer_id: bytes
    public_key: bytes
    addresses: tuple[str, ...]
    dtype: str
    decode_tps: float
    prefill_tps: float
    free_cache_tokens: int
    load: float
    seq: int
    expiry: float
    withdrawn: bool = False
    rtts: dict[bytes, float] = field(default_factory=dict, hash=False)

    @property
    def blocks(self) -> range:
        return range(self.span_start, self.span_end)

    @cached_property
    def key_names(self) -> tuple[str, ...]:
        """Every DHT key name this entry is published under."""
        blocks = tuple(block_key(self.model_id, b) for b in self.blocks)
        return (*blocks, model_directory_key(self.model_id), MODELS_KEY)

    @cached_property
    def dht_keys(self) -> frozenset[bytes]:
        return frozenset(dht_key(name) for name in self.key_names)

    def is_expired(self, now: float) -> bool:
        return self.expiry <= now


def sign_entry(entry: ProviderEntry, identity: Identity) -> bytes:
    """Validate ``entry`` and return its signed wire form; raises :class:`RecordError` on bad fields."""
    if entry.peer_id != identity.peer_id or entry.public_key != identity.public_key:
        raise RecordError("an entry must carry the peer id and public key of the identity signing it")
    _validate(entry)
    payload = msgpack.packb([_VERSION, *(_to_wire(name, getattr(entry, name)) for name in _FIELDS)])
    return msgpack.packb([payload, identity.sign(_DOMAIN + payload)])


def decode_entry(wire: bytes) -> ProviderEntry:
    """Check size, schema, the public-key-to-peer-id binding and the signature of a wire entry."""
    if not isinstance(wire, bytes) or len(wire) > MAX_ENTRY_BYTES:
        raise RecordError(f"an entry is bytes of at most {MAX_ENTRY_BYTES} bytes")
    try:
        payload, signature = msgpack.unpackb(wire)
        fields = msgpack.unpackb(payload)
    except (ValueError, TypeError) as exc:  # msgpack raises ValueError subclasses
        raise RecordError(f"entry does not decode: {exc}") from exc
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise RecordError("entry is not [payload, 64-byte signature]")
    if not isinstance(fields, list) or len(fields) != len(_FIELDS) + 1 or fields[0] != _VERSION:
        raise RecordError(f"entry payload is not a version-{_VERSION} field list")
    values = {name: _from_wire(name, value) for name, value in zip(_FIELDS, fields[1:], strict=True)}
    entry = ProviderEntry(**values)
    _validate(entry)
    if peer_id_of(entry.public_key) != entry.peer_id:
        raise RecordError(f"entry's public key does not hash to its peer id {entry.peer_id.hex()[:12]}")
    if not verify_signature(entry.public_key, signature, _DOMAIN + payload):
        raise RecordError(f"bad signature on entry of peer {entry.peer_id.hex()[:12]}")
    return entry


class EntryCache:
    """Remembers entries already verified, keyed by their exact wire bytes.

    Storing nodes receive the same signed bytes once per key of a span, and clients receive them
    once per block and per holder: verifying each distinct entry once keeps Ed25519 off the hot path.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[bytes, ProviderEntry] = OrderedDict()

    def decode(self, wire: bytes) -> ProviderEntry:
        entry = self._entries.get(wire)
        if entry is not None:
            self._entries.move_to_end(wire)
            return entry
        entry = decode_entry(wire)
        self._entries[wire] = entry
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return entry


# Order of the fields on the wire; changing it needs a new _VERSION.
_FIELDS = (
    "model_id",
    "total_blocks",
    "span_start",
    "span_end",
    "peer_id",
    "public_key",
    "addresses",
    "dtype",
    "decode_tps",
    "prefill_tps",
    "free_cache_tokens",
    "load",
    "seq",
    "expiry",
    "withdrawn",
    "rtts",
)


def _to_wire(name: str, value: object) -> object:
    if name == "addresses":
        return list(value)  # type: ignore[call-overload]
    if name == "rtts":
        # Sorted pairs, not a map, so equal RTT tables always encode to equal bytes.
        return [[peer, float(rtt)] for peer, rtt in sorted(value.items())]  # type: ignore[attr-defined]
    if name in _FLOAT_FIELDS:
        return float(value)  # type: ignore[arg-type]
    return value


def _from_wire(name: str, value: object) -> object:
    if name == "addresses":
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise RecordError("addresses must be a list of strings")
        return tuple(value)
    if name == "rtts":
        if not isinstance(value, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], bytes) for p in value
        ):
            raise RecordError("rtts must be a list of [peer id, seconds] pairs")
        table = {peer: rtt for peer, rtt in value}
        if len(table) != len(value):
            raise RecordError("rtts lists a peer twice")
        return table
    return value


_FLOAT_FIELDS = frozenset({"decode_tps", "prefill_tps", "load", "expiry"})
_INT_FIELDS = frozenset({"total_blocks", "span_start", "span_end", "free_cache_tokens", "seq"})


def _validate(entry: ProviderEntry) -> None:
    """Schema and range checks shared by signing (bad local input) and decoding (bad remote input)."""
    for name in _INT_FIELDS:
        value = getattr(entry, name)
        if type(value) is not int or value < 0:
            raise RecordError(f"{name} must be a non-negative int, got {value!r}")
    for name in _FLOAT_FIELDS:
        value = getattr(entry, name)
        if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
            raise RecordError(f"{name} must be a finite non-negative number, got {value!r}")
    if (
        not isinstance(entry.model_id, str)
        or not 0 < len(entry.model_id) <= MAX_MODEL_ID_CHARS
        or not entry.model_id.isprintable()
    ):
        raise RecordError(f"model_id must be 1-{MAX_MODEL_ID_CHARS} printable characters")
    if not 0 < entry.total_blocks <= MAX_BLOCKS:
        raise RecordError(f"total_blocks must be 1-{MAX_BLOCKS}, got {entry.total_blocks}")
    if not entry.span_start < entry.span_end <= entry.total_blocks:
        raise RecordError(
            f"span [{entry.span_start}, {entry.span_end}) is empty or past total_blocks {entry.total_blocks}"
        )
    if entry.seq > MAX_SEQ:
        raise RecordError("seq is over 2**63 - 1")
    for name, size in (("peer_id", PEER_ID_BYTES), ("public_key", PUBLIC_KEY_BYTES)):
        value = getattr(entry, name)
        if not isinstance(value, bytes) or len(value) != size:
            raise RecordError(f"{name} must be {size} bytes")
    if not isinstance(entry.withdrawn, bool):
        raise RecordError("withdrawn must be a bool")
    if not isinstance(entry.dtype, str) or not 0 < len(entry.dtype) <= MAX_DTYPE_CHARS:
        raise RecordError(f"dtype must be 1-{MAX_DTYPE_CHARS} characters")
    if len(entry.addresses) > MAX_ADDRESSES:
        raise RecordError(f"at most {MAX_ADDRESSES} addresses")
    for address in entry.addresses:
        if not isinstance(address, str) or len(address) > MAX_ADDRESS_CHARS:
            raise RecordError(f"an address is a string of at most {MAX_ADDRESS_CHARS} characters")
        try:
            parse_host_port(address)
        except AddressError as exc:
            raise RecordError(f"bad data-plane address: {exc}") from exc
    if len(entry.rtts) > MAX_RTTS:
        raise RecordError(f"at most {MAX_RTTS} RTTs")
    for peer, rtt in entry.rtts.items():
        if not isinstance(peer, bytes) or len(peer) != PEER_ID_BYTES:
            raise RecordError("an RTT's peer id must be 32 bytes")
        if type(rtt) not in (int, float) or not math.isfinite(rtt) or rtt < 0:
            raise RecordError(f"an RTT must be a finite non-negative number of seconds, got {rtt!r}")
