"""QUIC data plane for Python: an asyncio endpoint over the native ngtcp2 core (see docs/transport.md)."""

from inferencemesh.transport.config import EndpointStats, PeerStats, TransportConfig
from inferencemesh.transport.endpoint import Address, Endpoint, Frame, FrameWait, Handler
from inferencemesh.transport.errors import (
    ConnectionLost,
    EndpointClosed,
    ErrorKind,
    FrameTooLarge,
    HandshakeFailed,
    InvalidFrame,
    PeerIdMismatch,
    PeerUnreachable,
    RemoteError,
    RequestTimeout,
    ResourceExhausted,
    TransportError,
)

__all__ = [
    "Address",
    "ConnectionLost",
    "Endpoint",
    "EndpointClosed",
    "EndpointStats",
    "ErrorKind",
    "Frame",
    "FrameTooLarge",
    "FrameWait",
    "Handler",
    "HandshakeFailed",
    "InvalidFrame",
    "PeerIdMismatch",
    "PeerStats",
    "PeerUnreachable",
    "RemoteError",
    "RequestTimeout",
    "ResourceExhausted",
    "TransportConfig",
    "TransportError",
]
