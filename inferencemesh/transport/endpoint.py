"""asyncio face of the native QUIC endpoint.

The endpoint's I/O thread lives in C++ and runs its timers. The loop's thread reads the socket itself
(``loop.add_reader`` on the native ``datagram_fd``, readable while datagrams wait): a datagram wakes
this thread alone, where the I/O thread reading it and then waking this one cost ~0.1 ms more per
message on a loaded VM. While the loop's thread is busy for long (:meth:`Endpoint.set_busy`) the I/O
thread reads instead and reports through an eventfd, also watched with ``add_reader``, so nothing
polls. Requests resolve futures; incoming frames are handed to the handler set with
``set_handler``. With ``TransportConfig(loop_reads_socket=False)`` the I/O thread always reads.
Everything runs on the loop's thread except :meth:`Endpoint.send_soon`,
:meth:`Endpoint.send_or_report`, a prepared send and :meth:`Endpoint.await_frame`, which any thread
may call (the native endpoint is thread-safe).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
import inspect
import ipaddress
import itertools
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from inferencemesh import _core
from inferencemesh.transport.config import EndpointStats, PeerStats, TransportConfig
from inferencemesh.transport.errors import EndpointClosed, error_for

log = logging.getLogger(__name__)

# A frame to send: a ``_core.EncodedFrame`` (zero-copy over its tensors) or any contiguous bytes-like
# object holding one complete frame (zero-copy over its memory; do not modify it until the call returns).
Frame = Any
Address = tuple[str, int]
# handler(peer_id, buffer) -> response frame for a request, None for a one-way message; may be a
# coroutine function or a plain function (the latter runs inline, saving a task per message).
Handler = Callable[[bytes, Any], Awaitable[Frame | None] | Frame | None]
# on_arrival(peer_id, request_id) of an expected frame (see Endpoint.expect_frame)
Arrival = Callable[[bytes, int], None]


class FrameWait(enum.IntEnum):
    """What Endpoint.await_frame found."""

    ARRIVED = 0  # the frame came: its tensor is in place
    TIMED_OUT = 1  # still expected
    NOT_EXPECTED = 2  # taken before the wait, withdrawn, or the endpoint closed


# FrameWait by the native outcome: indexing costs ~0 us where calling the enum costs ~9 us, cold
# (bench/bench_cold_calls.py), on the way of every step a busy-poll or a waiting client thread takes.
_FRAME_WAITS = tuple(FrameWait)
_RESPONSE, _FAILED, _SENT, _INCOMING, _EXPECTED = 0, 1, 2, 3, 4
_APP_HANDLER_FAILED = 1  # stream error code the requester sees as RemoteError (csrc/quic/types.h)
# asyncio's timers fire up to ~1 ms late (its selector waits in whole milliseconds): an expected
# message's wait is scheduled this much early and sleeps the rest in ppoll, which keeps time to the
# microsecond (see Endpoint.expect_message).
_TIMER_SLACK_S = 0.0015


class Endpoint:
    """One QUIC endpoint per process: serves incoming frames and sends requests to peers."""

    def __init__(self, native: Any, loop: asyncio.AbstractEventLoop, config: TransportConfig) -> None:
        self._native = native
        self._loop = loop
        self._loop_thread = threading.get_ident()  # made on the loop's thread (start)
        self._config = config
        self._tokens = itertools.count(1)
        # token -> (outcome, peer id): an asyncio future, a concurrent.futures one (send_soon: any
        # thread may wait on it) or a _FailureReport (send_or_report); the loop thread resolves them.
        self._pending: dict[int, tuple[_Outcome, bytes]] = {}
        self._numeric: dict[Address, tuple[str, int]] = {}
        self._handler: Handler | None = None
        self._arrivals: dict[int, Arrival] = {}  # expect_frame's token -> on_arrival
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._expectation: asyncio.TimerHandle | None = None
        # Busy-polling takes a CPU from the work that sends the message when there is only one.
        self.may_busy_poll = config.loop_reads_socket and len(os.sched_getaffinity(0)) > 1
        self.busy_polls = 0  # expected messages waited for by busy-polling (see expect_message) ...
        self.busy_polls_caught = 0  # ... and of those, the ones a message came within
        self.peer_id: bytes = native.peer_id
        self.port: int = native.port
        loop.add_reader(native.event_fd, self._on_events)
        if config.loop_reads_socket:
            loop.add_reader(native.datagram_fd, self._on_datagrams)
            native.receive_on_consumer_thread(True)

    @classmethod
    async def start(
        cls,
        private_key: bytes,
        host: str = "::",
        port: int = 0,
        config: TransportConfig | None = None,
        pool: Any = None,
    ) -> Endpoint:
        """Binds UDP ``host:port`` (``"::"``: IPv4 and IPv6; port 0: any free port) and starts the I/O
        thread. ``private_key`` is the node's 32-byte Ed25519 seed; ``pool`` an optional
        ``_core.BufferPool`` for received frames (e.g. one with page-locking hooks)."""
        config = config or TransportConfig()
        if len(private_key) != 32:
            raise ValueError("private_key must be the 32-byte Ed25519 seed")
        native = _core.quic.Endpoint(
            bytes(private_key), host, port, config.to_native(_core.quic.Config), pool
        )
        return cls(native, asyncio.get_running_loop(), config)

    @property
    def address(self) -> str:
        """The bound socket address, e.g. ``[::]:4001`` or ``127.0.0.1:4001``."""
        return str(self._native.local_address)

    def set_handler(self, handler: Handler | None) -> None:
        self._handler = handler

    async def request(
        self, peer_id: bytes, address: Address | None, frame: Frame, timeout: float | None = None
    ) -> Any:
        """Sends a request frame and returns the response as a ``_core.Buffer``.

        ``address`` None means: use the existing connection with the peer (the way a chain's last worker
        answers a client behind NAT), or the last address it was reached at. Raises a TransportError
        subclass; ``RequestTimeout`` after ``timeout`` (default ``config.request_timeout_s``)."""
        return await self._submit(True, peer_id, address, frame, timeout)

    async def send(self, peer_id: bytes, address: Address | None, frame: Frame) -> None:
        """Sends a one-way frame. Returns once QUIC has taken every byte (flow control admitted it), so a
        slow receiver slows the sender down; the frame stays referenced until the peer acknowledged it."""
        await self._submit(False, peer_id, address, frame, None)

    def send_soon(
        self, peer_id: bytes, address: Address | None, frame: Frame
    ) -> concurrent.futures.Future[None]:
        """Sends a one-way frame now, without waiting, from any thread: the frame is handed to QUIC
        before this returns (when the address is numeric or known). The future tells when QUIC has
        taken every byte, or why it could not; the caller must look at its outcome (e.g. in a done
        callback, which runs on the loop's thread). Raises EndpointClosed when closed."""
        if address is not None and address not in self._numeric and not _is_numeric(address[0]):
            return asyncio.run_coroutine_threadsafe(self.send(peer_id, address, frame), self._loop)
        host, port = (None, 0) if address is None else self._numeric_address(address)
        sent: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._start(False, peer_id, host, port, frame, None, sent)
        return sent

    def send_or_report(
        self,
        peer_id: bytes,
        address: Address | None,
        frame: Frame,
        on_failure: Callable[[BaseException], None],
    ) -> None:
        """:meth:`send_soon` without a future, for a sender that only needs to learn of a failure:
        ``on_failure(error)`` runs on the loop's thread if QUIC cannot take every byte (also when
        the endpoint is closed). A future and its done callback cost ~25 us of a step's way when
        the caches are cold (after a forward), a plain callback ~5."""
        self.prepare_send(peer_id, address, frame, on_failure)()

    def prepare_send(
        self,
        peer_id: bytes,
        address: Address | None,
        frame: Frame,
        on_failure: Callable[[BaseException], None],
    ) -> Callable[[], None]:
        """:meth:`send_or_report` made ready ahead: returns ``send()``, which hands the frame over,
        from any thread, once. The peer id, its address and the frame are converted now, for a
        sender that knows its message before its moment comes (a worker's output, encoded before
        the forward): right after a forward has left the caches cold, those conversions cost
        ~15 us of the hop. Until it is sent, the frame's request id may still be rewritten
        (``set_request_id``). One never sent is simply dropped."""
        if address is not None and address not in self._numeric and not _is_numeric(address[0]):
            return functools.partial(self._send_resolving, peer_id, address, frame, on_failure)
        host, port = (None, 0) if address is None else self._numeric_address(address)
        prepared = self._native.prepare_send(next(self._tokens), peer_id, host, port, frame)
        return functools.partial(self._send_prepared, prepared, (_FailureReport(on_failure), peer_id))

    def _send_prepared(self, prepared: Any, pending: tuple[_FailureReport, bytes]) -> None:
        token = prepared.token
        self._pending[token] = pending  # before the native call, which may report on it at once
        if self._closed or not prepared.send():
            del self._pending[token]
            pending[0].set_exception(EndpointClosed("the endpoint is closed", pending[1]))

    def _send_resolving(
        self, peer_id: bytes, address: Address, frame: Frame, on_failure: Callable[[BaseException], None]
    ) -> None:
        """A send to a host name, which the loop's thread resolves first."""
        try:
            self.send_soon(peer_id, address, frame).add_done_callback(_report_failure(on_failure))
        except EndpointClosed as exc:
            on_failure(exc)

    async def _submit(
        self, is_request: bool, peer_id: bytes, address: Address | None, frame: Frame, timeout: float | None
    ) -> Any:
        if address is None:
            host, port = None, 0
        else:
            host, port = self._numeric.get(address) or await self._resolve(address)
        future: asyncio.Future[Any] = self._loop.create_future()
        token = self._start(is_request, peer_id, host, port, frame, timeout, future)
        try:
            return await future
        finally:
            if self._pending.pop(token, None) is not None:  # the caller was cancelled: stop the request
                self._native.cancel(token)

    def _start(
        self,
        is_request: bool,
        peer_id: bytes,
        host: str | None,
        port: int,
        frame: Frame,
        timeout: float | None,
        future: _Outcome,
    ) -> int:
        """Hands the frame to the native endpoint; ``future`` resolves with the response or the send.
        Safe from any thread: the token is registered before the native call can report on it."""
        if self._closed:
            raise EndpointClosed("the endpoint is closed", peer_id)
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        token = next(self._tokens)
        self._pending[token] = (future, peer_id)
        try:
            if is_request:
                # The native endpoint runs the timeout (an asyncio timer per request costs ~10 us).
                delay = self._config.request_timeout_s if timeout is None else timeout
                self._native.request(token, peer_id, host, port, frame, delay)
            else:
                self._native.send(token, peer_id, host, port, frame)
        except BaseException:
            del self._pending[token]
            raise
        return token

    async def _resolve(self, address: Address) -> tuple[str, int]:
        host, port = address
        if not _is_numeric(host):
            infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            return str(infos[0][4][0]), int(port)
        return self._numeric_address(address)

    def _numeric_address(self, address: Address) -> tuple[str, int]:
        known = self._numeric.get(address)
        if known is not None:
            return known
        numeric = (address[0].strip("[]"), int(address[1]))
        # Numeric addresses never change meaning; remembering them keeps parsing off the hot path.
        if len(self._numeric) < 4096:
            self._numeric[address] = numeric
        return numeric

    def expect_frame(
        self,
        kind: int,
        flags: int,
        metadata: bytes,
        request_ids: tuple[int, int],
        dtype: int,
        shape: tuple[int, ...],
        on_arrival: Arrival,
    ) -> tuple[int, Any]:
        """Expects a message known in advance but for its request id and its one tensor: kind, flags and
        metadata bytes exactly these, a request id in ``request_ids`` (inclusive), a tensor of dtype
        code ``dtype`` and ``shape``. The native side matches it as it completes and copies its tensor
        into the returned ``_core.Buffer``; ``on_arrival(peer_id, request_id)`` then runs on the
        loop's thread instead of the handler, once, unless a thread in :meth:`await_frame` took it.
        Returns (token, buffer); ``forget_frame(token)`` withdraws it.
        Decoding and comparing such a message in Python took ~40 us of a hop with cold caches
        (docs/benchmarks.md). Raises ValueError when a frame with the same metadata is already
        expected. Any thread may call it."""
        token = next(self._tokens)
        self._arrivals[token] = on_arrival
        try:
            buffer = self._native.expect(token, kind, flags, metadata, *request_ids, dtype, list(shape))
        except BaseException:
            del self._arrivals[token]
            raise
        return token, buffer

    def await_frame(self, token: int, sleep_s: float, spin_s: float) -> tuple[FrameWait, int, bytes]:
        """Waits for the frame of an expect_frame on the calling thread (the GIL is released),
        reading the socket itself meanwhile: sleeps up to ``sleep_s``, then busy-polls up to
        ``spin_s``. Returns (outcome, request id, sender) with the last two for ARRIVED only: the
        frame came, its tensor is in place, and ``on_arrival`` does not run. TIMED_OUT also when
        other messages came meanwhile: their events wait for the loop's thread (:meth:`_on_events`),
        and the caller may wait again. A thread that waits so for its own message (a client's step
        result) has it with no wake-up and no hand-off from the loop's thread: ~110 us less of a
        step's way on the VM of docs/benchmarks.md. Meanwhile the datagrams it reads do not wake the
        loop's thread either (the native endpoint's datagram_fd, which the loop watches, leaves the
        socket out while such a thread waits): that wake-up found them read, took a CPU the waiting
        thread could use, and cost the sender's ``sendmsg`` ~20 us (traced, docs/benchmarks.md)."""
        quiet = threading.get_ident() != self._loop_thread
        outcome, request_id, sender = self._native.await_expected(token, sleep_s, spin_s, quiet)
        if outcome == FrameWait.ARRIVED:
            self._arrivals.pop(token, None)
        return _FRAME_WAITS[outcome], request_id, sender

    def forget_frame(self, token: int) -> None:
        """Withdraws an expect_frame. One that a message already took still reports its arrival (the
        event is on its way): ``on_arrival`` must cope with a state that moved on."""
        if token in self._arrivals and self._native.forget_expected(token):
            del self._arrivals[token]

    def set_busy(self, busy: bool) -> None:
        """True before work that holds the loop's thread for long (a forward), False after: meanwhile
        the I/O thread reads the socket, so ACKs, flow control and transfers to this endpoint keep
        moving; the messages that arrive wait for the loop, as they would anyway."""
        if self._config.loop_reads_socket:
            self._native.receive_on_consumer_thread(not busy)

    def expect_message(self, at: float, window: float, frame: int | None = None) -> None:
        """Busy-polls the socket from ``at - window`` to ``at + window`` (loop time, seconds), or
        until a message arrives, for a message expected then: a session's next decode step, whose
        arrival its steps before foretell. With ``frame``, the token of an expect_frame, that frame
        is taken as it arrives (:meth:`await_frame`) and its ``on_arrival`` runs straight away,
        without the events' way through Python. A message that lands on a running thread skips the
        wake-up of a sleeping one, ~60 us per message across the vCPUs of the VM in docs/benchmarks.md, where
        a lone session's step crosses four of them. The loop's thread is held meanwhile (up to
        ``2 * window`` plus ~1.5 ms asleep in ppoll), so callers expect only while nothing else needs
        it: one session, steps far apart. One expectation at a time: a new one replaces the last.
        A process confined to one CPU never busy-polls: the spin would take it from the work that
        sends the message."""
        if self._expectation is not None:
            self._expectation.cancel()
        if not self.may_busy_poll or window <= 0 or self._closed:
            self._expectation = None
            return
        start, end = at - window, at + window
        wait = self._await_expected if frame is None else functools.partial(self._await_frame, frame)
        self._expectation = self._loop.call_at(start - _TIMER_SLACK_S, wait, start, end)

    def _await_expected(self, start: float, end: float) -> None:
        self._expectation = None
        now = self._loop.time()
        if now < end:  # not held up past the window (by inline compute, say)
            self.busy_polls += 1
        while now < end and not self._closed:
            if not self._native.await_datagram(start - now, end - max(start, now)):
                return
            if self._message_came(self._native.receive()):
                return
            now = self._loop.time()

    def _await_frame(self, token: int, start: float, end: float) -> None:
        self._expectation = None
        now = self._loop.time()
        on_arrival = self._arrivals.get(token)
        if now >= end or on_arrival is None:  # held up past the window, or no longer expected
            return
        self.busy_polls += 1
        while now < end and not self._closed:
            outcome, request_id, sender = self.await_frame(token, start - now, end - max(start, now))
            if outcome == FrameWait.ARRIVED:
                self.busy_polls_caught += 1
                _call_arrival(on_arrival, sender, request_id)
                return
            if outcome == FrameWait.NOT_EXPECTED:
                return
            if self._message_came(self._native.poll()):  # another message ends the wait too
                return
            now = self._loop.time()

    def _message_came(self, events: list[tuple[Any, ...]]) -> bool:
        """Handles the events a busy-poll read; whether a message came (not only ACKs), which ends it."""
        self._handle_events(events)
        if any(event[0] != _SENT for event in events):
            self.busy_polls_caught += 1
            return True
        return False

    def _on_datagrams(self) -> None:
        self._handle_events(self._native.receive())

    def _on_events(self) -> None:
        self._handle_events(self._native.poll())

    def _handle_events(self, events: list[tuple[Any, ...]]) -> None:
        for event in events:
            kind = event[0]
            if kind == _INCOMING:
                self._dispatch(event[1], event[2], event[3], event[4])
                continue
            if kind == _EXPECTED:
                self._arrived(event[1], event[3], event[2])
                continue
            entry = self._pending.pop(event[1], None)
            if entry is None or entry[0].done():
                continue
            if kind == _FAILED:
                entry[0].set_exception(error_for(event[2], event[3], entry[1]))
            else:
                entry[0].set_result(event[2] if kind == _RESPONSE else None)

    def _arrived(self, token: int, peer_id: bytes, request_id: int) -> None:
        on_arrival = self._arrivals.pop(token, None)
        if on_arrival is not None:  # else closed meanwhile
            _call_arrival(on_arrival, peer_id, request_id)

    def _dispatch(self, incoming: int, peer_id: bytes, buffer: Any, expects_response: bool) -> None:
        handler = self._handler
        if handler is None:
            log.warning("frame from peer %s dropped: no handler is set", peer_id.hex()[:12])
            self._complete(incoming, expects_response, None)
            return
        try:
            result = handler(peer_id, buffer)
        except Exception:
            log.exception("handler failed on a frame from peer %s", peer_id.hex()[:12])
            self._fail(incoming, expects_response)
            return
        if inspect.isawaitable(result):
            task = self._loop.create_task(self._finish_async(incoming, peer_id, expects_response, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._complete(incoming, expects_response, result)

    async def _finish_async(
        self, incoming: int, peer_id: bytes, expects_response: bool, result: Awaitable[Any]
    ) -> None:
        try:
            response = await result
        except Exception:
            log.exception("handler failed on a frame from peer %s", peer_id.hex()[:12])
            self._fail(incoming, expects_response)
            return
        self._complete(incoming, expects_response, response)

    def _complete(self, incoming: int, expects_response: bool, response: Frame | None) -> None:
        """Answers a frame its handler is done with. No answer (None) finishes it: a one-way message,
        or a request the handler had nothing for, which its requester learns as RemoteError. The
        native side resets such a stream with the next packet to the peer: before ngtcp2 0.14 one-way
        messages come on bidirectional streams too (``expects_response`` is then True), and a reset
        of its own cost two packets and two wake-ups per message."""
        if self._closed:
            return
        if response is None:
            self._native.finish(incoming)
            return
        if not expects_response:
            log.warning("handler returned a response to a one-way message; it is dropped")
            self._native.finish(incoming)
            return
        try:
            self._native.respond(incoming, response)
        except ValueError:
            log.exception("handler returned something that is not a frame")
            self._native.reject(incoming, _APP_HANDLER_FAILED)

    def _fail(self, incoming: int, expects_response: bool) -> None:
        """The handler raised: a requester learns it at once (RemoteError)."""
        if self._closed:
            return
        if expects_response:
            self._native.reject(incoming, _APP_HANDLER_FAILED)
        else:
            self._native.finish(incoming)

    def peer_stats(self, peer_id: bytes) -> PeerStats | None:
        """Statistics of the live connection(s) with a peer, or None when there is none."""
        stats = self._native.peer_stats(peer_id)
        return None if stats is None else PeerStats(**stats)

    def stats(self) -> EndpointStats:
        return EndpointStats(**self._native.stats())

    async def close(self) -> None:
        """Closes every connection, fails outstanding operations with EndpointClosed, stops handlers."""
        if self._closed:
            return
        self._closed = True
        if self._expectation is not None:
            self._expectation.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._arrivals.clear()
        self._loop.remove_reader(self._native.event_fd)
        self._loop.remove_reader(self._native.datagram_fd)  # a no-op when the I/O thread reads it
        self._native.close()
        for event in self._native.poll():
            entry = self._pending.pop(event[1], None) if event[0] == _FAILED else None
            if entry is not None and not entry[0].done():
                entry[0].set_exception(error_for(event[2], event[3], entry[1]))
        while self._pending:  # popitem: send_soon may still be adding from another thread
            _, (future, peer_id) = self._pending.popitem()
            if not future.done():
                future.set_exception(EndpointClosed("the endpoint is closed", peer_id))

    async def __aenter__(self) -> Endpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _FailureReport:
    """What send_or_report waits on instead of a future: the failure callback, nothing else."""

    __slots__ = ("on_failure",)

    def __init__(self, on_failure: Callable[[BaseException], None]) -> None:
        self.on_failure = on_failure

    def done(self) -> bool:
        return False

    def set_result(self, result: Any) -> None:
        pass

    def set_exception(self, error: BaseException) -> None:
        # As a future does with its done callbacks: a failing callback must not cut short the
        # events being handled with it.
        try:
            self.on_failure(error)
        except Exception:
            log.exception("a send's failure callback failed")


_Outcome = asyncio.Future[Any] | concurrent.futures.Future[Any] | _FailureReport


def _report_failure(
    on_failure: Callable[[BaseException], None],
) -> Callable[[concurrent.futures.Future[None]], None]:
    def done(future: concurrent.futures.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            on_failure(future.exception())  # type: ignore[arg-type]

    return done


def _call_arrival(on_arrival: Arrival, peer_id: bytes, request_id: int) -> None:
    try:
        on_arrival(peer_id, request_id)
    except Exception:
        log.exception("the arrival of an expected frame from peer %s failed", peer_id.hex()[:12])


def _is_numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
