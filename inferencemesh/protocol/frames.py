"""Encode and decode messages: a kind, a request id, a msgpack metadata map and torch tensors.

Tensor bytes are never copied: ``encode_message`` returns a ``_core.EncodedFrame`` whose segments point
into the tensors, and ``decode_message`` returns tensors that view the received buffer (which stays
alive as long as any of them does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from inferencemesh import _core
from inferencemesh.protocol.errors import MetadataError


@dataclass(frozen=True)
class FrameLimits:
    """Bounds every decoder enforces; a frame over any of them is rejected with FrameError(OVERSIZED)."""

    max_frame_size: int = _core.DEFAULT_MAX_FRAME_SIZE
    max_metadata_size: int = _core.DEFAULT_MAX_METADATA_SIZE
    max_tensors: int = _core.DEFAULT_MAX_TENSORS


DEFAULT_LIMITS = FrameLimits()


@dataclass
class Message:
    kind: int
    request_id: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)
    flags: int = 0


def encode_message(
    kind: int,
    request_id: int,
    metadata: Mapping[str, Any] | None = None,
    tensors: Sequence[torch.Tensor] = (),
    *,
    flags: int = 0,
    limits: FrameLimits = DEFAULT_LIMITS,
) -> _core.EncodedFrame:
    """Encodes a message. Tensors must be contiguous and in host memory (FrameError otherwise)."""
    return _core.encode_frame(
        kind,
        request_id,
        pack_metadata(metadata),
        tensors,
        flags,
        limits.max_frame_size,
        limits.max_metadata_size,
        limits.max_tensors,
    )


def dtype_code(dtype: torch.dtype) -> int:
    """How frames name a tensor dtype (``_core.DTYPE_CODES``); KeyError for one they cannot carry."""
    return _core.DTYPE_CODES[str(dtype).removeprefix("torch.")]


def pack_metadata(metadata: Mapping[str, Any] | None) -> bytes:
    """The metadata block :func:`encode_message` writes: the same map in the same key order always
    gives the same bytes (msgpack picks the shortest form of each value)."""
    return msgpack.packb(dict(metadata or {}), use_bin_type=True)


def decode_metadata(packed: bytes) -> dict[str, Any]:
    try:
        metadata = msgpack.unpackb(packed, raw=False, strict_map_key=True) if packed else {}
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise MetadataError(f"frame metadata is not valid msgpack: {exc!r}") from exc
    if not isinstance(metadata, dict):
        raise MetadataError(f"frame metadata must be a map, got {type(metadata).__name__}")
    return metadata


def decode_message(buffer: Any, *, limits: FrameLimits = DEFAULT_LIMITS) -> Message:
    """Validates a complete frame held in ``buffer`` (a ``_core.Buffer`` or any bytes-like object)."""
    return message_from_frame(decode_frame(buffer, limits=limits))


def decode_frame(buffer: Any, *, limits: FrameLimits = DEFAULT_LIMITS) -> _core.DecodedFrame:
    """Validates a complete frame's layout: header, metadata and tensor bounds, not the metadata."""
    return _core.decode_frame(buffer, limits.max_frame_size, limits.max_metadata_size, limits.max_tensors)


def message_from_frame(frame: _core.DecodedFrame) -> Message:
    """The message a validated frame holds (its tensors view the frame's buffer)."""
    return Message(
        kind=frame.kind,
        request_id=frame.request_id,
        metadata=decode_metadata(frame.metadata),
        tensors=[torch.from_dlpack(capsule) for capsule in frame.dlpacks()],
        flags=frame.flags,
    )
