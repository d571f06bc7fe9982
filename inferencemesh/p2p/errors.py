"""Typed errors of the P2P control plane, so callers can tell bad input from an empty swarm."""

from __future__ import annotations


class P2PError(Exception):
    """Base class of every error raised by :mod:`inferencemesh.p2p`."""


class IdentityError(P2PError):
    """An identity file is unreadable, malformed or holds the wrong kind of key."""


class AddressError(P2PError, ValueError):
    """A bootstrap or data-plane address does not parse."""


class RecordError(P2PError, ValueError):
    """A DHT entry is malformed, too large, badly signed, expired or bound to the wrong key or peer."""


class NoRouteError(P2PError):
    """No chain of usable workers covers every block of the model.

    ``missing_blocks`` lists the (0-based) blocks that no usable provider serves.
    """

    def __init__(self, model_id: str, missing_blocks: list[int]) -> None:
        self.model_id = model_id
        self.missing_blocks = missing_blocks
        super().__init__(
            f"no route for model {model_id!r}: no usable provider for blocks "
            f"{_compact_ranges(missing_blocks)}"
        )


def _compact_ranges(blocks: list[int]) -> str:
    """Format sorted block indices as ``0-3, 7, 9-10`` so long gaps stay readable in one line."""
    parts: list[str] = []
    start = prev = None
    for block in sorted(blocks):
        if prev is not None and block == prev + 1:
            prev = block
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = block
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(parts)
