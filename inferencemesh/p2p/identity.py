"""Node identity: an Ed25519 key pair, its peer id, and its file on disk.

Team convention (shared with the transport): the peer id is SHA-256 of the 32-byte raw public key;
its text form is 64 lowercase hex characters and logs show the first 12. The DHT node id is the
first 20 bytes of the peer id. The QUIC endpoint receives the 32-byte raw private seed.

Identity files: ``load_or_create`` writes an unencrypted PEM PKCS8 private key, created with mode
0600. Reading also accepts a file holding exactly the 32 raw seed bytes, so a key made by other
tools (or ``head -c 32 /dev/urandom``) can be used as is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from inferencemesh.p2p.errors import IdentityError

PEER_ID_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
DHT_ID_BYTES = 20
SHORT_ID_CHARS = 12

_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def peer_id_of(public_key: bytes) -> bytes:
    """The peer id (32 bytes) that a raw Ed25519 public key stands for."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return hashlib.sha256(public_key).digest()


def short_id(peer_id: bytes) -> str:
    """The prefix of a peer id that logs show."""
    return peer_id.hex()[:SHORT_ID_CHARS]


def parse_peer_id(text: str) -> bytes:
    """Parse the 64-hex-character text form of a peer id."""
    cleaned = text.strip().lower()
    if len(cleaned) != 2 * PEER_ID_BYTES or any(c not in "0123456789abcdef" for c in cleaned):
        raise IdentityError(f"a peer id is {2 * PEER_ID_BYTES} hex characters, got {text!r}")
    return bytes.fromhex(cleaned)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is the Ed25519 signature of ``message`` by ``public_key``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """An Ed25519 private key with the derived peer id."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(*_RAW)
        self.peer_id: bytes = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise IdentityError(f"an Ed25519 seed has 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a PEM PKCS8 Ed25519 key or a 32-byte raw seed."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read identity file {path}: {exc}") from exc
        if len(data) == 32 and not data.startswith(b"-----"):
            return cls.from_seed(data)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"{path} is neither a PEM PKCS8 private key nor a 32-byte seed") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the identity at ``path``, creating it (mode 0600, PEM PKCS8) when the file is missing."""
        if os.path.exists(path):
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as PEM PKCS8; refuses to overwrite, and never exists with wider permissions."""
        pem = self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            # O_EXCL with the mode given at creation: the key is never readable by others, not even
            # for the instant between creating and chmod-ing the file.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise IdentityError(f"cannot create identity file {path}: {exc}") from exc
        with os.fdopen(fd, "wb") as file:
            file.write(pem)

    @property
    def private_seed(self) -> bytes:
        """The 32-byte raw private key (what the QUIC endpoint takes)."""
        return self._private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def dht_id(self) -> bytes:
        return self.peer_id[:DHT_ID_BYTES]

    @property
    def peer_id_hex(self) -> str:
        return self.peer_id.hex()

    @property
    def short_id(self) -> str:
        return short_id(self.peer_id)

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)

    def __repr__(self) -> str:
        return f"Identity({self.short_id})"
