"""Message kinds spoken between clients and workers, and the typed errors a worker sends back.

A message is one frame (see docs/protocol.md); its kind byte is a ``MessageKind`` and its metadata map
carries the fields listed in docs/swarm.md. A worker answers any request it cannot serve with an
``ERROR`` message whose metadata holds an ``ErrorCode`` and a human-readable message; the client turns
it back into a ``WorkerError`` (or the subclass for that code).
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

from inferencemesh.protocol.frames import Message, encode_message


class MessageKind(enum.IntEnum):
    ERROR = 1
    PING = 2  # request -> PONG with the worker's info
    PONG = 3
    FORWARD = 4  # stateless forward of a span (request -> FORWARD_RESULT)
    FORWARD_RESULT = 5
    OPEN_SESSION = 6  # request -> SESSION_OPENED
    SESSION_OPENED = 7
    STEP = 8  # one-way along the chain: compute, then pass on or deliver STEP_RESULT to the client
    STEP_RESULT = 9  # one-way from the last hop to the client
    CLOSE_SESSION = 10  # request -> SESSION_CLOSED
    SESSION_CLOSED = 11


def kind_name(kind: int) -> str:
    """The name of a message kind, or its number when it is not one this version knows."""
    try:
        return MessageKind(kind).name
    except ValueError:
        return str(kind)


class ErrorCode(enum.IntEnum):
    BAD_REQUEST = 1  # malformed metadata or an unknown message kind
    WRONG_SHAPE = 2  # hidden states of the wrong rank or hidden size
    WRONG_DTYPE = 3  # hidden states in a dtype the worker does not serve
    UNKNOWN_SESSION = 4  # no such session for this client (never opened, closed, expired or foreign)
    CACHE_FULL = 5  # the KV cache budget cannot hold the session
    LENGTH_EXCEEDED = 6  # the step would run past the session's max length
    OUT_OF_ORDER = 7  # the step's position is not the session's current length
    NEXT_HOP_FAILED = 8  # the worker computed its span but could not reach the next hop
    SHUTTING_DOWN = 9  # the worker is draining and takes no new work
    INTERNAL = 10  # the worker failed unexpectedly (its log has the cause)
    WRONG_MODEL = 11  # the request names a model or span this worker does not serve
    TOO_LARGE = 12  # too many tokens in one request


class WorkerError(Exception):
    """A worker refused or failed a request. ``peer_id`` is the worker that reported it."""

    code: ErrorCode = ErrorCode.INTERNAL
    # ERROR code -> the class a client raises for it; every subclass registers its own code.
    by_code: ClassVar[dict[int, type[WorkerError]]] = {}

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        WorkerError.by_code[cls.code] = cls

    def __init__(self, message: str, peer_id: bytes | None = None, failed_peer: bytes | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id
        # For NEXT_HOP_FAILED: the downstream worker that could not be reached.
        self.failed_peer = failed_peer


class CacheFull(WorkerError):
    code = ErrorCode.CACHE_FULL


class UnknownSession(WorkerError):
    code = ErrorCode.UNKNOWN_SESSION


class LengthExceeded(WorkerError):
    code = ErrorCode.LENGTH_EXCEEDED


class BadRequest(WorkerError):
    code = ErrorCode.BAD_REQUEST


class WrongShape(BadRequest):
    code = ErrorCode.WRONG_SHAPE


class WrongDtype(BadRequest):
    code = ErrorCode.WRONG_DTYPE


class OutOfOrder(WorkerError):
    code = ErrorCode.OUT_OF_ORDER


class NextHopFailed(WorkerError):
    code = ErrorCode.NEXT_HOP_FAILED


class ShuttingDown(WorkerError):
    code = ErrorCode.SHUTTING_DOWN


class WrongModel(BadRequest):
    code = ErrorCode.WRONG_MODEL


class TooLarge(BadRequest):
    code = ErrorCode.TOO_LARGE


def step_result_metadata(session_id: bytes, position: int) -> dict[str, Any]:
    """A STEP_RESULT's metadata: the session, and its length after the step. Built here for both
    sides: a client that knows its next result expects these bytes exactly (Endpoint.expect_frame)."""
    return {"session_id": session_id, "position": position}


def error_message(request_id: int, error: WorkerError, **extra: Any) -> Any:
    """The ERROR frame that reports ``error`` for request ``request_id``."""
    metadata = {"code": int(error.code), "message": str(error), **extra}
    if error.failed_peer is not None:
        metadata["failed_peer"] = error.failed_peer
    return encode_message(MessageKind.ERROR, request_id, metadata)


def error_from_message(message: Message, peer_id: bytes | None) -> WorkerError:
    """Rebuilds the typed error carried by an ERROR message."""
    code = message.metadata.get("code")
    cls = WorkerError.by_code.get(code, WorkerError) if isinstance(code, int) else WorkerError
    text = str(message.metadata.get("message", "worker error"))
    failed = message.metadata.get("failed_peer")
    return cls(text, peer_id=peer_id, failed_peer=failed if isinstance(failed, bytes) else None)
