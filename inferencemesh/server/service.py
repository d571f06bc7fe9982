"""What a worker does with each message it receives (message fields: docs/swarm.md).

Requests (PING, OPEN_SESSION, CLOSE_SESSION, FORWARD) are answered on their own stream. A STEP is
one-way: the worker computes its span and passes the result on to the next hop of the chain the step
carries, or, being the last hop, delivers STEP_RESULT to the client over the connection the client
opened. Whatever goes wrong with a step is reported to the client as an ERROR naming the step, so the
client learns of a failure at once instead of waiting for a timeout. Bad input never takes the worker
down: every message is validated before it touches the span.

Steps are handled without a task or an await on their way: validated on arrival, queued in their
session, computed (see scheduler.py), and their output handed to QUIC without waiting for the send to
complete. A session's steps run in step-id order; one that arrives before an earlier one waits for it
up to REORDER_WAIT_S (a client may send several steps back to back, e.g. the chunks of a prompt).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from inferencemesh.compute import errors as compute_errors
from inferencemesh.compute.span import Span, format_block_range
from inferencemesh.p2p.address import parse_host_port
from inferencemesh.p2p.identity import short_id
from inferencemesh.protocol.errors import FrameError
from inferencemesh.protocol.frames import (
    FrameLimits,
    Message,
    decode_frame,
    dtype_code,
    encode_message,
    message_from_frame,
    pack_metadata,
)
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
    step_result_metadata,
)
from inferencemesh.server.scheduler import Burst, ComputeScheduler, Done
from inferencemesh.server.sessions import QueuedStep, ServerSession, SessionRegistry
from inferencemesh.transport.endpoint import Endpoint
from inferencemesh.transport.errors import TransportError

log = logging.getLogger(__name__)

HIDDEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_CHAIN_HOPS = 64
MAX_QUEUED_STEPS = 64  # steps of one session waiting for their turn
MAX_BURST = 4096  # most steps a client may announce as one burst
REORDER_WAIT_S = 2.0  # how long a step waits for an earlier step of its session to arrive
PREPARE_AFTER_S = 0.001  # when the next step's outgoing message is encoded, after a step's send
STEP_TIMES_KEPT = 1024  # decode steps whose forward time a PING with step_times reports
_MAX_STEP_ID = 2**64 - 1


@dataclass
class _Outgoing:
    """A step's output message, encoded around ``buffer``: to the next hop, or the result to the client."""

    client: bytes
    step_id: int
    peer: bytes  # the next hop, or the client
    address: str | None  # the next hop's 'host:port'; None: the result, over the client's connection
    frame: Any
    buffer: torch.Tensor  # [rows, hidden_size] host memory the output is copied into
    send: Callable[[], None] = field(init=False)  # hands the frame to QUIC, once (prepare_send)

    def renumber(self, step_id: int) -> None:
        """Makes it the message of step ``step_id`` (it was encoded before that step arrived)."""
        self.step_id = step_id
        self.frame.set_request_id(step_id)


@dataclass(eq=False)
class _Prepared:
    """A session's expected next step, made ready before it arrives (see WorkerService._prepare_next):
    the step itself, but for its id and hidden state, which the endpoint fills in as it arrives
    (Endpoint.expect_frame), and the message that takes its output on."""

    session: ServerSession
    outgoing: _Outgoing | None
    step: QueuedStep | None = None  # set once the endpoint gave the memory of its hidden state
    token: int | None = None  # the endpoint's expect_frame
    release: Callable[[], None] = lambda: None  # withdraws the expectation
    # What _start takes for the foreseen step, made with it: its outcome's handler and output buffer.
    done: Done | None = None
    out: torch.Tensor | None = None

    def matches(self, step: QueuedStep) -> bool:
        """Whether ``step`` is the one foreseen (it may also have come decoded in full)."""
        foreseen = self.step
        return foreseen is not None and (
            step is foreseen or (step.rows == 1 and step.message.metadata == foreseen.message.metadata)
        )


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
        busy_poll_s: float = 0.0,
    ) -> None:
        self.span = span
        self.model_id = model_id
        self.sessions = sessions
        self.scheduler = scheduler
        self.endpoint = endpoint
        self.max_request_tokens = max_request_tokens
        self.frame_limits = frame_limits
        self.busy_poll_s = busy_poll_s  # see _expect_next_step
        self.draining = False
        self.errors = 0
        self.prepared_steps = 0  # steps whose outgoing message was encoded before they arrived
        self.foreseen_steps = 0  # steps the endpoint matched to a prepared one as they arrived
        # (step id, seconds of the forward that computed it) of the latest decode steps: with the
        # client's time for each step, what the swarm adds to a step besides compute (bench_mesh).
        self.step_times: collections.deque[tuple[int, float]] = collections.deque(maxlen=STEP_TIMES_KEPT)

    # ------------------------------------------------------------------ dispatch
    def handle(self, peer_id: bytes, buffer: Any) -> Any:
        """The endpoint's handler: None for a STEP (handled inline), else the response or a coroutine."""
        try:
            message = message_from_frame(decode_frame(buffer, limits=self.frame_limits))
        except FrameError as exc:
            log.warning("malformed frame from %s: %s", short_id(peer_id), exc)
            self.errors += 1
            return error_message(0, BadRequest(f"malformed frame: {exc}"))
        if message.kind == MessageKind.STEP:
            self._step(peer_id, message)
            return None
        if message.kind == MessageKind.PING:  # answered at once: probes measure liveness and RTT
            info = self.info()
            if message.metadata.get("step_times"):
                info["step_times"] = [list(entry) for entry in self.step_times]
            return encode_message(MessageKind.PONG, message.request_id, info)
        handler = self._requests.get(message.kind)
        if handler is None:
            return error_message(message.request_id, BadRequest(f"unknown message kind {message.kind}"))
        return self._answer(handler, peer_id, message)

    async def _answer(self, handler: Callable[..., Any], peer_id: bytes, message: Message) -> Any:
        try:
            return await handler(self, peer_id, message)
        except WorkerError as exc:
            self._note_refusal(peer_id, message.kind, exc)
            return error_message(message.request_id, exc)
        except Exception as exc:
            log.exception("request %s from %s failed", kind_name(message.kind), short_id(peer_id))
            return error_message(message.request_id, WorkerError(f"internal error: {exc!r}"))

    @property
    def in_flight(self) -> int:
        """Steps accepted and not finished yet (queued or computing)."""
        return sum(len(session.pending) + session.running for session in self.sessions)

    def _note_refusal(self, peer_id: bytes, kind: int, exc: WorkerError) -> None:
        self.errors += 1
        log.info("refused %s from %s: %s (%s)", kind_name(kind), short_id(peer_id), exc, exc.code.name)

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
            "compute": asdict(self.scheduler.stats),  # cumulative, since start
            "prepared_steps": self.prepared_steps,
            "foreseen_steps": self.foreseen_steps,
            # Steps waited for by busy-polling, and how many came within the window (busy_poll_us).
            "busy_polls": [self.endpoint.busy_polls, self.endpoint.busy_polls_caught],
        }

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
        computed: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        try:
            self.scheduler.submit(cache, hidden, functools.partial(_settle, computed))
            output = await computed
        finally:
            self.sessions.caches.free(key)
        return encode_message(MessageKind.FORWARD_RESULT, message.request_id, {}, [output])

    _requests = {
        MessageKind.OPEN_SESSION: _open_session,
        MessageKind.CLOSE_SESSION: _close_session,
        MessageKind.FORWARD: _forward,
    }

    # ------------------------------------------------------------------ chained steps
    def _step(self, sender: bytes, message: Message) -> None:
        client = message.metadata.get("client")
        if not isinstance(client, bytes):
            log.warning("step from %s without a client to answer: dropped", short_id(sender))
            self.errors += 1
            return
        try:
            session, step = self._accept(client, message)
            session.queue(step)
            self._advance(session)
        except Exception as exc:
            self._step_failed(sender, client, message.request_id, exc)

    def _step_failed(self, sender: bytes, client: bytes, step_id: int, exc: Exception) -> None:
        if isinstance(exc, WorkerError):
            self._note_refusal(sender, MessageKind.STEP, exc)
            self._report(client, step_id, exc)
            return
        log.error("step %d of client %s failed", step_id, short_id(client), exc_info=exc)
        self.errors += 1
        self._report(client, step_id, WorkerError(f"internal error: {exc!r}"))

    def _foreseen_arrived(self, prepared: _Prepared, sender: bytes, step_id: int) -> None:
        """The step a session's prepared message waits for came (see :meth:`_prepare_next`): its
        metadata byte for byte what that foresaw, its hidden state of the same dtype and shape as
        the step before, already copied into the foreseen step's tensor by the endpoint. Those passed
        every check of :meth:`_accept` one step earlier, so if the session is as it was then, the
        step starts at once; otherwise it takes the way of any step (queued, or refused)."""
        session, step = prepared.session, prepared.step
        assert step is not None
        self.foreseen_steps += 1
        step.step_id = step.message.request_id = step_id
        startable = (
            session.prepared is prepared
            and not session.cache.freed
            and not session.running
            and not session.pending
            and session.gap_timer is None
            and not self.draining
            and step.position == session.cache.length  # below max_length: _prepare_next checked
        )
        if not startable:
            self._step(sender, step.message)
            return
        # Its turn: the session is idle with nothing queued. What _run works out was made ahead.
        session.prepared = None  # nothing to withdraw: the endpoint took it
        self.prepared_steps += 1
        if prepared.outgoing is not None:
            prepared.outgoing.renumber(step_id)
        assert prepared.done is not None
        try:
            self._start(session, step, prepared.done, prepared.out, prepared.outgoing)
        except Exception as exc:
            self._step_failed(sender, session.client, step_id, exc)

    def _accept(self, client: bytes, message: Message) -> tuple[ServerSession, QueuedStep]:
        metadata = message.metadata
        if self.draining:
            raise ShuttingDown("worker is shutting down")
        session = self.sessions.get(
            client, _field(metadata, "session_id", bytes), _field(metadata, "token", bytes)
        )
        chain = self._chain(metadata)
        hidden = self._hidden(message)
        position = _field(metadata, "position", int)
        if position < 0:
            raise OutOfOrder(f"step at position {position}")
        if position + hidden.shape[0] > session.cache.max_length:
            raise LengthExceeded(
                f"{hidden.shape[0]} tokens at position {position} run past the session's max length "
                f"{session.cache.max_length}"
            )
        if len(session.pending) >= MAX_QUEUED_STEPS:
            raise TooLarge(f"{MAX_QUEUED_STEPS} steps of this session are already waiting")
        burst = self._burst(client, metadata)
        return session, QueuedStep(message.request_id, position, hidden, chain, message, burst)

    def _advance(self, session: ServerSession) -> None:
        """Starts the session's next step if it can run now."""
        while (step := session.next_step()) is not None:
            if step.step_id <= session.last_step:
                # The client gave up on this step and has sent a later one (a replay after a failover);
                # it arrives late from a worker that was frozen or cut off. Running it would rewind the
                # cache.
                log.info("stale step %d of session %s dropped", step.step_id, session.label)
                continue
            if step.position < session.cache.length:
                session.cache.truncate(step.position)  # a replay after a failover starts over
            if session.gap_timer is not None:
                session.gap_timer.cancel()
                session.gap_timer = None
            self._run(session, step)
            return
        if session.gap_timer is None and session.waits_for_earlier_step():
            loop = asyncio.get_running_loop()
            session.gap_timer = loop.call_later(REORDER_WAIT_S, self._earlier_step_missing, session)

    def _run(self, session: ServerSession, step: QueuedStep) -> None:
        """Computes a step whose turn has come: the session's next, and none of its steps computing."""
        outgoing = self._outgoing(session, step)
        done = functools.partial(self._computed, session, step, outgoing)
        self._start(session, step, done, self._output_buffer(step, outgoing), outgoing)

    def _start(
        self,
        session: ServerSession,
        step: QueuedStep,
        done: Done,
        out: torch.Tensor | None,
        outgoing: _Outgoing | None,
    ) -> None:
        """Submits a step whose turn has come, ``done`` taking its outcome, ``out`` its output's buffer:
        ``outgoing``'s, which is then sent as soon as the forward wrote it, before the bookkeeping
        that follows a forward and ``done`` (~20 us of the hop, cold)."""
        session.last_step = step.step_id
        if step.rows == 1:
            session.decode_starts.note(time.monotonic())
        else:
            session.decode_starts.reset()
        session.running = True
        try:
            written = None if out is None or outgoing is None else outgoing.send
            self.scheduler.submit(session.cache, step.hidden, done, step.burst, out, step.rows, written)
        except RuntimeError as exc:  # the compute loop stopped: the worker is shutting down
            session.running = False
            self._report(step.message.metadata["client"], step.step_id, ShuttingDown(str(exc)))
        except BaseException:
            session.running = False  # else the session's later steps would wait for this one forever
            raise

    def _earlier_step_missing(self, session: ServerSession) -> None:
        session.gap_timer = None
        if not session.waits_for_earlier_step():
            return
        step = session.pop_first()
        error = OutOfOrder(
            f"step at position {step.position}, but the session is at {session.cache.length} and no "
            f"earlier step arrived within {REORDER_WAIT_S} s"
        )
        self._note_refusal(step.message.metadata["client"], step.message.kind, error)
        self._report(step.message.metadata["client"], step.step_id, error)
        self._advance(session)

    def _computed(
        self,
        session: ServerSession,
        step: QueuedStep,
        outgoing: _Outgoing | None,
        output: torch.Tensor | None,
        error: BaseException | None,
    ) -> None:
        session.running = False
        try:
            if error is None and outgoing is not None:
                assert output is not None
                # Computed into its buffer, the output went as the forward wrote it (the scheduler
                # calls ``written`` exactly then: see _start); else it is copied there and sent now.
                if output is not outgoing.buffer:  # not computed into it (see _output_buffer)
                    rows = outgoing.buffer.shape[0]  # all of the output's rows, or the last (last_only)
                    # Into host memory, if on a GPU; slicing only when needed saves a cold torch call.
                    outgoing.buffer.copy_(output if output.shape[0] == rows else output[-rows:])
                    outgoing.send()
        except Exception as exc:
            error = exc
        if error is not None:
            log.error("step %d of session %s failed: %r", step.step_id, session.label, error)
            self.errors += 1
            failure = WorkerError(f"internal error: {error!r}")
            self._report(step.message.metadata["client"], step.step_id, failure)
        else:
            if step.rows == 1:
                self.step_times.append((step.step_id, session.cache.last_decode_s))
            if outgoing is not None and _predictable(step):
                asyncio.get_running_loop().call_later(PREPARE_AFTER_S, self._prepare_next, session, step)
        self._advance(session)

    def _outgoing(self, session: ServerSession, step: QueuedStep) -> _Outgoing | None:
        """The message that takes the step's output on: the one encoded ahead for it (see
        :meth:`_prepare_next`) when the step is the one expected, else encoded now."""
        prepared = session.drop_prepared()
        if prepared is not None and prepared.matches(step):
            self.prepared_steps += 1
            if prepared.outgoing is not None:
                prepared.outgoing.renumber(step.step_id)
            return prepared.outgoing
        return self._encode_outgoing(session, step.step_id, step.message.metadata, step.position, step.rows)

    def _output_buffer(self, step: QueuedStep, outgoing: _Outgoing | None) -> torch.Tensor | None:
        """Where a decode step's forward may write its output: the outgoing message's buffer, when it
        is in the span's memory (the CPU). Copying the output there after the forward cost ~50 us of
        every hop, all of it cold (traced, docs/benchmarks.md)."""
        if outgoing is None or step.rows != 1 or self.span.device.type != "cpu":
            return None
        return outgoing.buffer

    def _prepare_next(self, session: ServerSession, step: QueuedStep) -> None:
        """Encodes the outgoing message of the session's expected next step after ``step``: one row at
        the next position, with the same metadata otherwise (as a client decoding one token after
        another sends), unless the session has moved on or ended meanwhile.

        It runs PREPARE_AFTER_S after ``step``'s output went out, while the next hops compute: on the
        step's arrival, with every cache cold after the other workers' forwards, encoding took ~100 us
        of a hop (traced, docs/benchmarks.md). Right after the send it would hold this worker's CPU
        while the next hop wakes up, which the kernel often schedules on the same CPU."""
        if session.cache.freed or session.last_step != step.step_id or session.pending or session.running:
            return
        position = step.position + step.rows
        if position >= session.cache.max_length:
            return  # a step there is refused (LengthExceeded) the usual way
        expected = dict(step.message.metadata, position=position)
        # The step id is not known yet (the client numbers steps across its sessions): _outgoing sets
        # it when the step arrives.
        outgoing = self._encode_outgoing(session, 0, expected, position, 1)
        session.drop_prepared()
        prepared = _Prepared(session, outgoing)
        dtype, shape = step.hidden.dtype, (1, self.span.config.hidden_size)
        try:
            token, memory = self.endpoint.expect_frame(
                MessageKind.STEP,
                step.message.flags,
                pack_metadata(expected),
                (session.last_step + 1, _MAX_STEP_ID),
                dtype_code(dtype),
                shape,
                functools.partial(self._foreseen_arrived, prepared),
            )
            hidden = torch.frombuffer(memory, dtype=dtype).view(shape)
            prepared.token = token
            prepared.release = functools.partial(self.endpoint.forget_frame, token)
        except (ValueError, MemoryError) as exc:  # no memory, or another session sends the same bytes
            log.debug("next step of session %s comes decoded in full: %s", session.label, exc)
            hidden = torch.empty(shape, dtype=dtype)  # only matches() looks at it then
        message = Message(MessageKind.STEP, 0, expected, [hidden], step.message.flags)
        foreseen = prepared.step = QueuedStep(0, position, hidden, expected["chain"], message)
        prepared.done = functools.partial(self._computed, session, foreseen, outgoing)
        prepared.out = self._output_buffer(foreseen, outgoing)
        session.prepared = prepared
        self._expect_next_step(session, prepared.token)

    def _expect_next_step(self, session: ServerSession, frame: int | None) -> None:
        """Has the endpoint busy-poll for the session's next step around when its steps before
        foretell it (one median gap between their starts after the last, busy_poll_s either side or
        more, as far as the latest steps came from their due times: Cadence.next_window), if this
        worker serves no other session: a step that lands on a running thread skips a wake-up
        across CPUs (see Endpoint.expect_message). ``frame``: the step's expect_frame, which the
        wait then takes natively, starting the step without the events' way through Python."""
        if self.busy_poll_s <= 0:
            return
        window = session.decode_starts.next_window(self.busy_poll_s)
        if window is not None and self.scheduler.serves_alone(session.cache):
            start, end = window  # loop time is time.monotonic()
            self.endpoint.expect_message((start + end) / 2, (end - start) / 2, frame)

    def _encode_outgoing(
        self, session: ServerSession, step_id: int, metadata: dict[str, Any], position: int, rows: int
    ) -> _Outgoing | None:
        """The message that takes a step's output on: to the next hop, or the result to the client
        (None for a partial step's last hop: the client waits for the last chunk only).

        It is encoded before the forward, around a buffer the output is copied into, because the caches
        are warm then: right after a span's forward has streamed its weights through them, the same
        encoding takes ~10x longer (7 us -> 87 us measured), on the critical path of the step."""
        client = metadata["client"]
        chain = metadata["chain"]
        if not chain:
            if metadata.get("partial"):
                return None
            buffer = self._host_buffer(1 if metadata.get("last_only") else rows)
            reply = step_result_metadata(session.session_id, position + rows)
            frame = encode_message(MessageKind.STEP_RESULT, step_id, reply, [buffer])
            return self._prepare_send(_Outgoing(client, step_id, client, None, frame, buffer))
        next_peer, next_address, next_token = chain[0]
        buffer = self._host_buffer(rows)
        forwarded = dict(metadata, token=next_token, chain=chain[1:])
        frame = encode_message(MessageKind.STEP, step_id, forwarded, [buffer])
        return self._prepare_send(_Outgoing(client, step_id, next_peer, next_address, frame, buffer))

    def _prepare_send(self, outgoing: _Outgoing) -> _Outgoing:
        """Makes the outgoing message's send ready, while the caches are warm (before the forward)."""
        address = None if outgoing.address is None else _address(outgoing.address)
        on_failure = functools.partial(self._not_sent, outgoing)
        outgoing.send = self.endpoint.prepare_send(outgoing.peer, address, outgoing.frame, on_failure)
        return outgoing

    def _not_sent(self, outgoing: _Outgoing, exc: BaseException) -> None:
        if outgoing.address is None:
            self._client_unreachable(outgoing.client, exc)
            return
        error = NextHopFailed(
            f"blocks {format_block_range(self.span.start, self.span.end)} computed, but the next hop "
            f"{short_id(outgoing.peer)} at {outgoing.address} failed: {exc}",
            failed_peer=outgoing.peer,
        )
        self._note_refusal(outgoing.client, MessageKind.STEP, error)
        self._report(outgoing.client, outgoing.step_id, error)

    def _host_buffer(self, rows: int) -> torch.Tensor:
        on_gpu = self.span.device.type == "cuda"
        return torch.empty(rows, self.span.config.hidden_size, dtype=self.span.dtype, pin_memory=on_gpu)

    def _report(self, client: bytes, step_id: int, error: WorkerError) -> None:
        extra = {"step_id": step_id, "reporter_start": self.span.start}
        frame = error_message(step_id, error, **extra)
        self._send(client, None, frame, functools.partial(self._client_unreachable, client))

    def _send(
        self,
        peer: bytes,
        address: tuple[str, int] | None,
        frame: Any,
        on_failure: Callable[[BaseException], None],
    ) -> None:
        try:
            self.endpoint.send_or_report(peer, address, frame, on_failure)
        except TransportError as exc:
            on_failure(exc)

    @staticmethod
    def _client_unreachable(client: bytes, exc: BaseException) -> None:
        log.info("could not reach client %s: %s", short_id(client), exc)

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
    def _burst(client: bytes, metadata: dict[str, Any]) -> Burst | None:
        """The optional ``burst: [id, size]``: the client sent this step with ``size - 1`` steps of its
        other sessions, to be computed together. Ids are the client's, so they are scoped to it."""
        value = metadata.get("burst")
        if value is None:
            return None
        valid = (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and value[0] >= 0
            and 1 <= value[1] <= MAX_BURST
        )
        if not valid:
            raise BadRequest(f"burst is [id >= 0, size in 1..{MAX_BURST}], got {value!r}")
        return Burst((client, value[0]), value[1])

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
            _address(hop[1])
        return chain


@functools.lru_cache(maxsize=4096)  # every step names its next hops; parse each address once
def _address(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError:
        raise BadRequest(f"bad hop address {text!r}") from None


def _predictable(step: QueuedStep) -> bool:
    """Whether the session's next step can be foretold from ``step``: not for steps of bursts (their
    burst ids change every round) nor prompt chunks (the next chunk has several rows)."""
    metadata = step.message.metadata
    return metadata.get("burst") is None and not metadata.get("partial")


def _settle(
    future: asyncio.Future[torch.Tensor], output: torch.Tensor | None, error: BaseException | None
) -> None:
    if future.done():  # the requester gave up
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(output)
