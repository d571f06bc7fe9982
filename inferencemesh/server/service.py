"""What a worker does with each message it receives (message fields: docs/swarm.md).

Requests (PING, OPEN_SESSION, CLOSE_SESSION, FORWARD) are answered on their own stream. A STEP is
one-way: the worker computes its span and passes the result on to the next hop of the chain the step
carries, or, being the last hop, delivers STEP_RESULT to the client over the connection the client
opened. Whatever goes wrong with a step is reported to the client as an ERROR naming the step, so the
client learns of a failure at once instead of waiting for a timeout. Bad input never takes the worker
down: every message is validated before it touches the span.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from inferencemesh.compute import errors as compute_errors
from inferencemesh.compute.span import Span, format_block_range
from inferencemesh.p2p.address import parse_host_port
from inferencemesh.p2p.identity import short_id
from inferencemesh.protocol.errors import FrameError
from inferencemesh.protocol.frames import FrameLimits, Message, decode_message, encode_message
from inferencemesh.protocol.messages import (
    BadRequest,
    CacheFull,
    LengthExceeded,
    MessageKind,
    NextHopFailed,
    OutOfOrder,
    ShuttingDown,
    TooLarge,
    WorkerError,
    WrongDtype,
    WrongModel,
    WrongShape,
    error_message,
    kind_name,
)
from inferencemesh.server.scheduler import ComputeScheduler
from inferencemesh.server.sessions import ServerSession, SessionRegistry
from inferencemesh.transport.endpoint import Endpoint
from inferencemesh.transport.errors import TransportError

log = logging.getLogger(__name__)

HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_CHAIN_HOPS = 64


def _field(metadata: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = metadata.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"field {name!r} is missing or not of the right type")
    return value


class WorkerService:
    def __init__(
        self,
        *,
        span: Span,
        model_id: str,
        sessions: SessionRegistry,
        scheduler: ComputeScheduler,
        endpoint: Endpoint,
        max_request_tokens: int,
        frame_limits: FrameLimits,
    ) -> None:
        self.span = span
        self.model_id = model_id
        self.sessions = sessions
        self.scheduler = scheduler
        self.endpoint = endpoint
        self.max_request_tokens = max_request_tokens
        self.frame_limits = frame_limits
        self.draining = False
        self.in_flight = 0
        self.errors = 0

    # ------------------------------------------------------------------ dispatch
    async def handle(self, peer_id: bytes, buffer: Any) -> Any:
        try:
            message = decode_message(buffer, limits=self.frame_limits)
        except FrameError as exc:
            log.warning("malformed frame from %s: %s", short_id(peer_id), exc)
            self.errors += 1
            return error_message(0, BadRequest(f"malformed frame: {exc}"))
        if message.kind == MessageKind.STEP:
            await self._step(peer_id, message)
            return None
        handler = self._requests.get(message.kind)
        if handler is None:
            return error_message(message.request_id, BadRequest(f"unknown message kind {message.kind}"))
        try:
            return await handler(self, peer_id, message)
        except WorkerError as exc:
            self._note_refusal(peer_id, message, exc)
            return error_message(message.request_id, exc)
        except Exception as exc:
            log.exception("request %s from %s failed", kind_name(message.kind), short_id(peer_id))
            return error_message(message.request_id, WorkerError(f"internal error: {exc!r}"))

    def _note_refusal(self, peer_id: bytes, message: Message, exc: WorkerError) -> None:
        self.errors += 1
        log.info(
            "refused %s from %s: %s (%s)", kind_name(message.kind), short_id(peer_id), exc, exc.code.name
        )

    # ------------------------------------------------------------------ requests
    def info(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "start": self.span.start,
            "end": self.span.end,
            "total_blocks": self.span.config.num_layers,
            "hidden_size": self.span.config.hidden_size,
            "dtype": str(self.span.dtype).removeprefix("torch."),
            "free_cache_tokens": self.sessions.caches.free_tokens,
            "sessions": len(self.sessions),
        }

    async def _ping(self, peer_id: bytes, message: Message) -> Any:
        return encode_message(MessageKind.PONG, message.request_id, self.info())

    async def _open_session(self, peer_id: bytes, message: Message) -> Any:
        if self.draining:
            raise ShuttingDown("worker is shutting down")
        self._check_model(message.metadata)
        self.sessions.open(
            peer_id,
            _field(message.metadata, "session_id", bytes),
            _field(message.metadata, "token", bytes),
            _field(message.metadata, "max_length", int),
        )
        reply = {"free_cache_tokens": self.sessions.caches.free_tokens}
        return encode_message(MessageKind.SESSION_OPENED, message.request_id, reply)

    async def _close_session(self, peer_id: bytes, message: Message) -> Any:
        self.sessions.close(
            peer_id, _field(message.metadata, "session_id", bytes), _field(message.metadata, "token", bytes)
        )
        return encode_message(MessageKind.SESSION_CLOSED, message.request_id, {})

    async def _forward(self, peer_id: bytes, message: Message) -> Any:
        """A stateless forward: the span over a whole sequence, with a cache that lives for this call."""
        if self.draining:
            raise ShuttingDown("worker is shutting down")
        self._check_model(message.metadata)
        hidden = self._hidden(message)
        key = ("forward", peer_id, message.request_id)
        try:
            cache = self.sessions.caches.allocate(key, hidden.shape[0])
        except compute_errors.CacheFull as exc:
            raise CacheFull(f"KV cache full for a {hidden.shape[0]}-token forward") from exc
        except compute_errors.DuplicateSession as exc:
            raise BadRequest("a forward with this request id is already running") from exc
        try:
            output = await self.scheduler.run(cache, hidden)
        finally:
            self.sessions.caches.free(key)
        return encode_message(MessageKind.FORWARD_RESULT, message.request_id, {}, [output])

    _requests = {
        MessageKind.PING: _ping,
        MessageKind.OPEN_SESSION: _open_session,
        MessageKind.CLOSE_SESSION: _close_session,
        MessageKind.FORWARD: _forward,
    }

    # ------------------------------------------------------------------ chained steps
    async def _step(self, sender: bytes, message: Message) -> None:
        metadata = message.metadata
        client = metadata.get("client")
        if not isinstance(client, bytes):
            log.warning("step from %s without a client to answer: dropped", short_id(sender))
            self.errors += 1
            return
        self.in_flight += 1
        try:
            await self._run_step(client, message)
        except WorkerError as exc:
            self._note_refusal(sender, message, exc)
            await self._report(client, message, exc)
        except Exception as exc:
            log.exception("step %d of client %s failed", message.request_id, short_id(client))
            await self._report(client, message, WorkerError(f"internal error: {exc!r}"))
        finally:
            self.in_flight -= 1

    async def _run_step(self, client: bytes, message: Message) -> None:
        metadata = message.metadata
        if self.draining:
            raise ShuttingDown("worker is shutting down")
        session = self.sessions.get(
            client, _field(metadata, "session_id", bytes), _field(metadata, "token", bytes)
        )
        chain = self._chain(metadata)
        hidden = self._hidden(message)
        if message.request_id <= session.last_step:
            # The client gave up on this step and has sent a later one (a replay after a failover); it
            # arrives late from a worker that was frozen or cut off. Running it would rewind the cache.
            log.info("stale step %d of session %s dropped", message.request_id, session.label)
            return
        self._check_position(session, _field(metadata, "position", int), hidden.shape[0])
        session.last_step = message.request_id
        output = await self.scheduler.run(session.cache, hidden)
        if chain:
            await self._pass_on(client, message, chain, output)
            return
        if metadata.get("last_only"):
            output = output[-1:]
        result = encode_message(
            MessageKind.STEP_RESULT,
            message.request_id,
            {"session_id": session.session_id, "position": session.cache.length},
            [output],
        )
        await self.endpoint.send(client, None, result)

    async def _pass_on(
        self, client: bytes, message: Message, chain: list[list[Any]], output: torch.Tensor
    ) -> None:
        next_peer, next_address, next_token = chain[0]
        forwarded = dict(message.metadata, token=next_token, chain=chain[1:])
        frame = encode_message(MessageKind.STEP, message.request_id, forwarded, [output])
        try:
            await self.endpoint.send(next_peer, _address(next_address), frame)
        except TransportError as exc:
            raise NextHopFailed(
                f"blocks {format_block_range(self.span.start, self.span.end)} computed, but the next hop "
                f"{short_id(next_peer)} at {next_address} failed: {exc}",
                failed_peer=next_peer,
            ) from exc

    async def _report(self, client: bytes, message: Message, error: WorkerError) -> None:
        extra = {"step_id": message.request_id, "reporter_start": self.span.start}
        try:
            await self.endpoint.send(client, None, error_message(message.request_id, error, **extra))
        except TransportError as exc:
            log.info("could not report %s to client %s: %s", error.code.name, short_id(client), exc)

    # ------------------------------------------------------------------ validation
    def _check_model(self, metadata: dict[str, Any]) -> None:
        model_id = _field(metadata, "model_id", str)
        if model_id != self.model_id:
            raise WrongModel(f"this worker serves {self.model_id}, not {model_id}")

    def _hidden(self, message: Message) -> torch.Tensor:
        if len(message.tensors) != 1:
            raise BadRequest(f"expected one hidden-state tensor, got {len(message.tensors)}")
        hidden = message.tensors[0]
        size = self.span.config.hidden_size
        if hidden.dim() != 2 or hidden.shape[1] != size or hidden.shape[0] == 0:
            raise WrongShape(f"hidden states must be [tokens, {size}], got {list(hidden.shape)}")
        if hidden.dtype not in HIDDEN_DTYPES:
            raise WrongDtype(f"hidden states must be float32, bfloat16 or float16, got {hidden.dtype}")
        if hidden.shape[0] > self.max_request_tokens:
            raise TooLarge(f"{hidden.shape[0]} tokens in one request; the limit is {self.max_request_tokens}")
        return hidden

    @staticmethod
    def _check_position(session: ServerSession, position: int, tokens: int) -> None:
        cache = session.cache
        if position != cache.length:
            # A client replaying history after a failover rewinds explicitly to an earlier position.
            if 0 <= position < cache.length:
                cache.truncate(position)
            else:
                raise OutOfOrder(f"step at position {position}, but the session is at {cache.length}")
        if position + tokens > cache.max_length:
            raise LengthExceeded(
                f"{tokens} tokens at position {position} run past the session's max length {cache.max_length}"
            )

    def _chain(self, metadata: dict[str, Any]) -> list[list[Any]]:
        chain = _field(metadata, "chain", list)
        if len(chain) > MAX_CHAIN_HOPS:
            raise BadRequest(f"a chain of {len(chain)} hops is longer than {MAX_CHAIN_HOPS}")
        for hop in chain:
            valid = (
                isinstance(hop, list)
                and len(hop) == 3
                and isinstance(hop[0], bytes)
                and isinstance(hop[1], str)
                and isinstance(hop[2], bytes)
            )
            if not valid:
                raise BadRequest("chain hops are [peer_id, 'host:port', token]")
        return chain


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError:
        raise BadRequest(f"bad hop address {text!r}") from None
