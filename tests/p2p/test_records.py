import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from p2p_forge import claiming_peer, make_entry, sign_unchecked, signed, with_bad_signature

from inferencemesh.p2p.errors import RecordError
from inferencemesh.p2p.identity import Identity
from inferencemesh.p2p.records import (
    MAX_ADDRESSES,
    MAX_DTYPE_CHARS,
    MAX_ENTRY_BYTES,
    MAX_MODEL_ID_CHARS,
    MAX_RTTS,
    MODELS_KEY,
    EntryCache,
    block_key,
    decode_entry,
    dht_key,
    model_directory_key,
    sign_entry,
)

ALICE = Identity.generate()
MALLORY = Identity.generate()


def test_signed_entry_round_trips_with_every_field():
    entry = make_entry(ALICE, model="org/model", total=30, start=10, end=20, seq=7,
                       rtts={Identity.generate().peer_id: 0.004}, load=0.5, addresses=("[::1]:7001", "h:1"))
    assert decode_entry(sign_entry(entry, ALICE)) == entry


def test_entry_is_published_under_its_blocks_the_model_directory_and_the_models_index():
    entry = make_entry(ALICE, model="m", total=30, start=3, end=6)
    assert entry.key_names == (block_key("m", 3), block_key("m", 4), block_key("m", 5),
                               model_directory_key("m"), MODELS_KEY)
    assert dht_key(block_key("m", 6)) not in entry.dht_keys


def test_tampering_with_any_byte_of_the_payload_breaks_the_signature():
    wire = signed(ALICE)
    payload, signature = msgpack.unpackb(wire)
    for i in range(len(payload)):
        tampered = payload[:i] + bytes([payload[i] ^ 0x01]) + payload[i + 1:]
        with pytest.raises(RecordError):
            decode_entry(msgpack.packb([tampered, signature]))


def test_forgeries_are_rejected():
    victim = make_entry(ALICE)
    with pytest.raises(RecordError, match="bad signature"):
        decode_entry(with_bad_signature(signed(ALICE)))
    with pytest.raises(RecordError, match="does not hash to its peer id"):
        decode_entry(claiming_peer(victim, MALLORY))
    # Signed by the attacker for the victim's public key and id: the signature does not verify.
    with pytest.raises(RecordError, match="bad signature"):
        decode_entry(sign_unchecked(victim, MALLORY))


def test_signing_refuses_another_identity_s_entry():
    with pytest.raises(RecordError):
        sign_entry(make_entry(ALICE), MALLORY)


@pytest.mark.parametrize(
    "fields",
    [
        {"start": 5, "end": 5}, {"start": 6, "end": 5}, {"end": 31}, {"total": 0},
        {"total": 5000, "end": 5000},
        {"model": ""}, {"model": "x" * 129}, {"model": "bad\nid"}, {"seq": -1}, {"seq": 2**63},
        {"decode_tps": math.nan}, {"load": -1.0}, {"expiry": math.inf}, {"free_cache_tokens": 1.5},
        {"free_cache_tokens": True}, {"dtype": ""}, {"addresses": ("no-port",)}, {"addresses": ("h:1",) * 9},
        {"rtts": {b"short": 0.1}}, {"rtts": {bytes(32): -0.1}},
        {"rtts": {bytes([i]) * 32: 0.1 for i in range(MAX_RTTS + 1)}},
    ],
)
def test_bad_fields_are_refused_on_signing_and_on_decoding(fields):
    entry = make_entry(ALICE, **fields)
    with pytest.raises(RecordError):
        sign_entry(entry, ALICE)
    with pytest.raises(RecordError):
        decode_entry(sign_unchecked(entry, ALICE))


def test_the_largest_entry_the_schema_allows_fits_the_byte_cap_and_longer_wires_are_refused():
    # So a valid worker never hits the cap, and a store request stays far below rpcudp's 8 KiB limit.
    largest = make_entry(
        ALICE, model="m" * MAX_MODEL_ID_CHARS, dtype="d" * MAX_DTYPE_CHARS,
        addresses=tuple(f"{'h' * 60}.{'g' * 13}:{7000 + i}" for i in range(MAX_ADDRESSES)),
        rtts={bytes([i]) * 32: 0.1 for i in range(MAX_RTTS)}, seq=2**63 - 1,
    )
    wire = sign_entry(largest, ALICE)
    assert len(wire) <= MAX_ENTRY_BYTES
    assert decode_entry(wire) == largest
    with pytest.raises(RecordError, match="at most"):
        decode_entry(wire + b"\x00" * (MAX_ENTRY_BYTES - len(wire) + 1))


def test_cache_returns_verified_entries_and_still_rejects_forgeries():
    cache = EntryCache(capacity=2)
    wire = signed(ALICE)
    assert cache.decode(wire) is cache.decode(wire)
    with pytest.raises(RecordError):
        cache.decode(with_bad_signature(wire))
    for seq in range(5):
        cache.decode(signed(ALICE, seq=seq))
    assert cache.decode(wire) == decode_entry(wire)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_decoder_raises_only_record_error_on_arbitrary_bytes(data):
    try:
        decode_entry(data)
    except RecordError:
        pass


_valid_fields = st.fixed_dictionaries({
    "model": st.text(st.characters(codec="utf-8", categories=("L", "N", "P")), min_size=1, max_size=40),
    "start": st.integers(0, 10),
    "end": st.integers(11, 30),
    "seq": st.integers(0, 2**63 - 1),
    "decode_tps": st.floats(0, 1e6),
    "load": st.floats(0, 100),
    "free_cache_tokens": st.integers(0, 2**40),
    "withdrawn": st.booleans(),
})


@settings(max_examples=100, deadline=None)
@given(_valid_fields, st.data())
def test_decoder_accepts_whatever_a_worker_can_sign(fields, data):
    entry = make_entry(ALICE, **fields)
    wire = sign_entry(entry, ALICE)
    assert decode_entry(wire) == entry
    # Any single-byte change in the whole wire form is caught.
    i = data.draw(st.integers(0, len(wire) - 1))
    flipped = wire[:i] + bytes([wire[i] ^ 0x40]) + wire[i + 1:]
    try:
        decoded = decode_entry(flipped)
    except RecordError:
        return
    assert decoded == entry  # nothing but the signed payload can come out of a valid decode

