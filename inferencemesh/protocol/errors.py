"""Typed errors of the frame codec and the buffer pool.

The native core raises ``FrameError`` (a ``ValueError``) with a numeric ``code`` and its ``code_name``;
``FrameErrorCode`` names those codes for Python callers. ``PoolExhausted`` (a ``MemoryError``) is raised
when a buffer pool's byte cap cannot hold a request.
"""

from __future__ import annotations

import enum

from inferencemesh._core import FrameError, PoolExhausted


class FrameErrorCode(enum.IntEnum):
    TRUNCATED = 1
    BAD_MAGIC = 2
    UNSUPPORTED_VERSION = 3
    OVERSIZED = 4
    BAD_DTYPE = 5
    TOO_MANY_DIMS = 6
    BAD_SHAPE = 7
    SIZE_MISMATCH = 8
    BAD_OFFSET = 9
    LENGTH_MISMATCH = 10
    RESERVED_NONZERO = 11
    NON_CONTIGUOUS = 12
    BUFFER_TOO_SMALL = 13
    BAD_ARGUMENT = 14
    # Raised by the Python layer: the metadata block is not a msgpack map.
    BAD_METADATA = 64


class MetadataError(FrameError):
    """The frame's metadata block could not be decoded into a map."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = int(FrameErrorCode.BAD_METADATA)
        self.code_name = FrameErrorCode.BAD_METADATA.name


__all__ = ["FrameError", "FrameErrorCode", "MetadataError", "PoolExhausted"]
