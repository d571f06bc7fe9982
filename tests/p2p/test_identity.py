import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from inferencemesh.p2p.errors import IdentityError
from inferencemesh.p2p.identity import Identity, parse_peer_id, peer_id_of, verify_signature


def test_created_identity_file_is_private_and_reloads_to_the_same_peer(tmp_path):
    path = tmp_path / "node.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = Identity.load_or_create(path)
    assert again.peer_id == first.peer_id
    assert again.private_seed == first.private_seed


def test_peer_id_follows_the_team_convention():
    identity = Identity.generate()
    assert len(identity.public_key) == 32 and len(identity.private_seed) == 32
    assert identity.peer_id == hashlib.sha256(identity.public_key).digest() == peer_id_of(identity.public_key)
    assert identity.peer_id_hex == identity.peer_id.hex() and len(identity.peer_id_hex) == 64
    assert identity.dht_id == identity.peer_id[:20]
    assert identity.short_id == identity.peer_id_hex[:12]
    assert Identity.from_seed(identity.private_seed).peer_id == identity.peer_id


def test_raw_seed_file_is_accepted(tmp_path):
    seed = os.urandom(32)
    (tmp_path / "raw.key").write_bytes(seed)
    assert Identity.load(tmp_path / "raw.key").private_seed == seed


def test_signatures_verify_only_for_the_signer_and_message():
    identity, other = Identity.generate(), Identity.generate()
    signature = identity.sign(b"hello")
    assert verify_signature(identity.public_key, signature, b"hello")
    assert not verify_signature(identity.public_key, signature, b"hellp")
    assert not verify_signature(other.public_key, signature, b"hello")
    assert not verify_signature(identity.public_key, signature[:10], b"hello")


@pytest.mark.parametrize("content", [b"", b"not a key", b"x" * 31, b"-----BEGIN PRIVATE KEY-----\nAAAA\n"])
def test_malformed_identity_files_raise_identity_error(tmp_path, content):
    (tmp_path / "bad.key").write_bytes(content)
    with pytest.raises(IdentityError):
        Identity.load(tmp_path / "bad.key")


def test_a_key_of_another_type_is_refused(tmp_path):
    pem = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "x25519.key").write_bytes(pem)
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        Identity.load(tmp_path / "x25519.key")


def test_missing_directory_and_existing_file_are_clear_errors(tmp_path):
    with pytest.raises(IdentityError):
        Identity.load(tmp_path / "absent.key")
    with pytest.raises(IdentityError):
        Identity.load_or_create(tmp_path / "no" / "such" / "dir.key")
    Identity.generate().save(tmp_path / "taken.key")
    with pytest.raises(IdentityError):
        Identity.generate().save(tmp_path / "taken.key")


def test_peer_id_text_parsing():
    identity = Identity.generate()
    assert parse_peer_id(identity.peer_id_hex.upper()) == identity.peer_id
    for bad in ["", "abc", identity.peer_id_hex[:-1] + "g", identity.peer_id_hex + "00"]:
        with pytest.raises(IdentityError):
            parse_peer_id(bad)
