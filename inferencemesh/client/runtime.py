"""The client's network side: a QUIC endpoint and a DHT client node on a private event loop thread.

The Python API is synchronous (like transformers); all networking runs as coroutines on one asyncio
loop owned by a background thread, and :meth:`MeshRuntime.call` runs a coroutine there and waits for
its result. Step results and error reports arrive as one-way messages from the workers; the runtime
hands each to the future of the step it names. Step futures are ``concurrent.futures`` ones: the
thread that sent a step waits on its future directly, so a step's round trip needs no coroutine and
no hand-off to the loop's thread (see RemoteSession.begin_step). The one step in flight needs none
back either: its thread reads the socket for its result itself (MeshRuntime.await_result).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import logging
import threading
import time
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import torch

from inferencemesh.p2p.identity import Identity, short_id
from inferencemesh.p2p.node import DHTNode
from inferencemesh.protocol.errors import FrameError
from inferencemesh.protocol.frames import Message, decode_message, dtype_code, encode_message, pack_metadata
from inferencemesh.protocol.messages import MessageKind, WorkerError, error_from_message
from inferencemesh.transport.cadence import Cadence
from inferencemesh.transport.config import TransportConfig
from inferencemesh.transport.endpoint import Endpoint, FrameWait

log = logging.getLogger(__name__)

T = TypeVar("T")

# While a request (e.g. a liveness probe) is outstanding, QUIC keep-alives go out every quarter of this
# and a peer that acknowledges none of them for this long is dead: its requests fail at once. ACKs come
# from the peer's native I/O thread, which a busy worker (compute, GIL) does not hold up, so a short
# deadline tells a dead or frozen worker from a busy one quickly (the workers' default is 1 s).
CLIENT_DEAD_PEER_TIMEOUT_S = 0.25
# While one step at a time is in flight, the thread waiting for its result busy-polls the socket this
# long either side of when the result is due (see MeshRuntime.await_result); 0: never.
RESULT_BUSY_POLL_S = 0.001
# A thread waiting for its step's result (MeshRuntime.await_result) looks at the step's future this
# often, for failures that reach only the future (a send that failed).
RESULT_WAIT_SLICE_S = 0.005


class MeshRuntime:
    def __init__(
        self,
        bootstrap: Sequence[str],
        *,
        host: str = "127.0.0.1",
        identity: Identity | None = None,
        transport: TransportConfig | None = None,
        busy_poll_s: float = RESULT_BUSY_POLL_S,
    ) -> None:
        self.identity = identity or Identity.generate()
        self._bootstrap = list(bootstrap)
        self._host = host
        self._transport = transport or TransportConfig(dead_peer_timeout_s=CLIENT_DEAD_PEER_TIMEOUT_S)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="inferencemesh-client", daemon=True
        )
        self._steps: dict[int, concurrent.futures.Future[Message]] = {}
        # step id -> its expect_frame token and the message its result will be (expect_result)
        self._expected_results: dict[int, tuple[int, Message]] = {}
        self.results_matched = 0  # step results the endpoint matched to an expect_result
        self.result_spins = 0  # waits for a step's result that busy-polled (await_result)
        self._busy_poll_s = busy_poll_s
        # Of the results that threads waiting in await_result took with no other step in flight.
        self._results = Cadence()
        # Ids distinct across client restarts; next() on a count is atomic, so any thread may take one.
        self._step_ids = itertools.count((int(time.time_ns() & 0xFFFF_FFFF) << 20) + 1)
        self.endpoint: Endpoint | None = None
        self.dht: DHTNode | None = None
        self._thread.start()
        try:
            self.call(self._start())
        except BaseException:
            self.close()
            raise

    async def _start(self) -> None:
        self.endpoint = await Endpoint.start(self.identity.private_seed, self._host, 0, self._transport)
        self.endpoint.set_handler(self._on_message)
        self.dht = await DHTNode.start(
            self.identity, host=self._host, port=0, bootstrap=self._bootstrap, client_mode=True
        )

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs ``coroutine`` on the runtime's loop and returns its result (re-raising its error)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout} s") from None
        except KeyboardInterrupt:
            future.cancel()
            raise

    def call_soon(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Starts ``coroutine`` on the runtime's loop without waiting for it, from any thread; a
        failure is logged. Once the runtime is closed it does nothing."""
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        except RuntimeError:  # the loop is closed
            coroutine.close()
            return
        future.add_done_callback(_log_failure)

    # ---------------------------------------------------------------- steps
    def new_step(self) -> tuple[int, concurrent.futures.Future[Message]]:
        """A step id and the future that the step's STEP_RESULT or ERROR will resolve (any thread)."""
        step_id = next(self._step_ids)
        future: concurrent.futures.Future[Message] = concurrent.futures.Future()
        self._steps[step_id] = future
        return step_id, future

    def new_burst(self) -> int:
        """An id for decode steps of several sessions sent together (STEP's ``burst``; any thread)."""
        return next(self._step_ids)

    def expect_result(
        self, step_id: int, metadata: dict[str, Any], dtype: torch.dtype, shape: tuple[int, int]
    ) -> None:
        """The STEP_RESULT of step ``step_id`` will carry ``metadata`` and one tensor of ``dtype`` and
        ``shape``: the endpoint matches it as it arrives and copies its tensor out, so the step's
        future gets it without a decode (Endpoint.expect_frame; a decode took ~50 us of a step's way,
        cold, traced). A result that differs comes decoded in full as usual. Any thread."""
        assert self.endpoint is not None
        message = Message(MessageKind.STEP_RESULT, step_id, metadata)
        arrived = functools.partial(self._result_arrived, message)
        try:
            token, memory = self.endpoint.expect_frame(
                MessageKind.STEP_RESULT,
                0,
                pack_metadata(metadata),
                (step_id, step_id),
                dtype_code(dtype),
                shape,
                arrived,
            )
        except (ValueError, MemoryError) as exc:
            log.debug("result of step %d comes decoded in full: %s", step_id, exc)
            return
        message.tensors.append(torch.frombuffer(memory, dtype=dtype).view(shape))
        self._expected_results[step_id] = (token, message)

    def await_result(
        self, step_id: int, result: concurrent.futures.Future[Message], timeout: float
    ) -> Message | None:
        """On the thread that sent step ``step_id``, the one step in flight: its result, taken as it
        arrives by this thread, which reads the socket meanwhile (Endpoint.await_frame), so that no
        wake-up and no Python on the loop's thread stand between the result and its user. Results
        then come at a steady pace, and the thread busy-polls around when this one is due (one
        median gap after the last, busy_poll_s either side or more: Cadence.next_window) instead
        of sleeping. None when other steps are in flight, or the result is not expected that way,
        or ``result`` is done (an error), or nothing came within ``timeout``: the caller then waits
        on ``result``."""
        entry = self._expected_results.get(step_id)
        endpoint = self.endpoint
        # Besides this step, one may be registered: the next, encoded ahead (RemoteSession.encode_next).
        # More are other steps in flight (other threads' sessions): their threads would all wake for
        # every datagram, so they wait on their futures, and the loop's thread reads.
        if len(self._steps) > 2:
            self._results.reset()  # no steady pace to foretell
            return None
        if entry is None or endpoint is None:
            return None
        token, message = entry
        now = time.monotonic()
        deadline = now + timeout
        spin_from = spin_until = deadline  # no spin
        window = self._results.next_window(self._busy_poll_s) if self._busy_poll_s > 0 else None
        if window is not None and endpoint.may_busy_poll:
            spin_from, spin_until = window[0], min(deadline, window[1])
        outcome = FrameWait.TIMED_OUT
        while outcome == FrameWait.TIMED_OUT and not result.done() and now < deadline:
            # In slices: a failure that does not withdraw the expectation (a send that failed) sets
            # ``result`` alone.
            if now < spin_from:
                sleep_s, spin_s = min(spin_from - now, RESULT_WAIT_SLICE_S), 0.0
            else:
                sleep_s, spin_s = 0.0, spin_until - now
                if spin_s <= 0:
                    sleep_s, spin_s = min(deadline - now, RESULT_WAIT_SLICE_S), 0.0
            if spin_s > 0:
                self.result_spins += 1
            outcome, _, _ = endpoint.await_frame(token, sleep_s, spin_s)
            now = time.monotonic()
        if outcome != FrameWait.ARRIVED:
            return None
        self._expected_results.pop(step_id, None)
        self.results_matched += 1
        self._results.note(now)
        return message

    def forget_step(self, step_id: int) -> None:
        self._steps.pop(step_id, None)
        self._forget_expected_result(step_id)

    def _forget_expected_result(self, step_id: int) -> None:
        entry = self._expected_results.pop(step_id, None)
        if entry is not None and self.endpoint is not None:
            self.endpoint.forget_frame(entry[0])

    def _result_arrived(self, message: Message, peer_id: bytes, step_id: int) -> None:
        """An expected result that no thread waited for in await_result (it came before)."""
        self._expected_results.pop(step_id, None)
        self.results_matched += 1
        self._resolve(peer_id, message)

    def _on_message(self, peer_id: bytes, buffer: Any) -> None:
        try:
            message = decode_message(buffer)
        except FrameError as exc:
            log.warning("malformed frame from %s: %s", short_id(peer_id), exc)
            return
        if message.kind not in (MessageKind.STEP_RESULT, MessageKind.ERROR):
            log.warning("unexpected %s from %s: dropped", message.kind, short_id(peer_id))
            return
        self._forget_expected_result(message.request_id)
        self._resolve(peer_id, message)

    def _resolve(self, peer_id: bytes, message: Message) -> None:
        """Hands a STEP_RESULT or ERROR to the future of the step it names."""
        future = self._steps.pop(message.request_id, None)
        if future is None or future.done():
            return  # a step we gave up on (timeout, failover)
        try:
            if message.kind == MessageKind.ERROR:
                future.set_exception(error_from_message(message, peer_id))
                self._results.reset()  # a failover follows: the pace starts over
                return
            future.set_result(message)
        except concurrent.futures.InvalidStateError:
            return  # its send failed meanwhile (reported on another thread)

    # ---------------------------------------------------------------- requests
    async def request(
        self,
        peer_id: bytes,
        address: tuple[str, int] | None,
        kind: MessageKind,
        metadata: dict[str, Any],
        timeout: float,
        tensors: Sequence[Any] = (),
    ) -> Message:
        """A request/response exchange with a worker; an ERROR reply raises its WorkerError."""
        assert self.endpoint is not None
        frame = encode_message(kind, 0, metadata, list(tensors))
        reply = decode_message(await self.endpoint.request(peer_id, address, frame, timeout=timeout))
        if reply.kind == MessageKind.ERROR:
            raise error_from_message(reply, peer_id)
        return reply

    def close(self) -> None:
        async def shutdown() -> None:
            for future in list(self._steps.values()):
                if not future.done():
                    future.set_exception(WorkerError("client closed"))
            if self.dht is not None:
                await self.dht.close()
            if self.endpoint is not None:
                await self.endpoint.close()
            # Background work still under way (a providers lookup, a dropped session's close) ends
            # here rather than being destroyed pending with the loop.
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("background work failed: %r", future.exception())


async def gather(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Runs the coroutines concurrently (on the runtime's loop); their results in order."""
    pending = list(coroutines)
    if len(pending) == 1:  # no task for a lone coroutine
        return [await pending[0]]
    return list(await asyncio.gather(*pending))
