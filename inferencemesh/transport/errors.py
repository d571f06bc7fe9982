"""Typed errors of the QUIC transport.

Every failure of a request or a send is a ``TransportError``; the subclass says what went wrong and
``peer_id`` (when known) which peer it concerned. The native endpoint reports failures as numeric error
kinds (``ErrorKind``, mirrored from csrc/quic/types.h); ``error_for`` maps them to these classes.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.IntEnum):
    PEER_ID_MISMATCH = 1
    PEER_UNREACHABLE = 2
    CONNECTION_LOST = 3
    HANDSHAKE_FAILED = 4
    FRAME_TOO_LARGE = 5
    INVALID_FRAME = 6
    REMOTE_ERROR = 7
    RESOURCE_EXHAUSTED = 8
    ENDPOINT_CLOSED = 9
    TIMEOUT = 10


class TransportError(Exception):
    """Base class of transport failures."""

    def __init__(self, message: str, peer_id: bytes | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class PeerIdMismatch(TransportError):
    """The peer's certificate key does not hash to the peer id we expected: the connection was refused."""


class PeerUnreachable(TransportError):
    """No connection could be made: nobody answered, or no address is known for the peer."""


class ConnectionLost(TransportError):
    """The connection died with the operation outstanding (peer stopped responding, closed, or restarted)."""


class HandshakeFailed(TransportError):
    """TLS refused the connection: no common ALPN, an unacceptable certificate, or a protocol error."""


class FrameTooLarge(TransportError, ValueError):
    """The frame exceeds the max frame size of this endpoint or of the peer."""


class InvalidFrame(TransportError, ValueError):
    """The peer rejected what it received as a malformed frame."""


class RemoteError(TransportError):
    """The peer's handler failed, or returned no response to a request."""


class ResourceExhausted(TransportError):
    """The receiver ran out of buffer memory, or the connection limit was reached."""


class EndpointClosed(TransportError):
    """The endpoint was closed before the operation completed."""


class RequestTimeout(TransportError, TimeoutError):
    """No response arrived within the request's timeout; the request was cancelled."""


_BY_KIND: dict[int, type[TransportError]] = {
    ErrorKind.PEER_ID_MISMATCH: PeerIdMismatch,
    ErrorKind.PEER_UNREACHABLE: PeerUnreachable,
    ErrorKind.CONNECTION_LOST: ConnectionLost,
    ErrorKind.HANDSHAKE_FAILED: HandshakeFailed,
    ErrorKind.FRAME_TOO_LARGE: FrameTooLarge,
    ErrorKind.INVALID_FRAME: InvalidFrame,
    ErrorKind.REMOTE_ERROR: RemoteError,
    ErrorKind.RESOURCE_EXHAUSTED: ResourceExhausted,
    ErrorKind.ENDPOINT_CLOSED: EndpointClosed,
    ErrorKind.TIMEOUT: RequestTimeout,
}


def error_for(kind: int, message: str, peer_id: bytes | None = None) -> TransportError:
    """The exception for a native error kind (an unknown kind gives the base class)."""
    return _BY_KIND.get(kind, TransportError)(message, peer_id)
