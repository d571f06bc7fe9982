"""An inference session across a chain of workers, with failover.

The client opens a session on every hop of the route (each with its own secret token), then sends
each step to the first hop with the rest of the chain attached; the last hop delivers the result back.
A step is sent and waited for on the caller's thread (begin_step, finish_steps); only a step that is
slow or fails continues on the runtime's loop, where the hops are probed and failover runs.
The client keeps the step inputs (token embeddings) it sent. When a hop dies, hangs or fails, the
session bans it, plans a new route, opens sessions on the replacements and replays the whole input
history as one prefill from position 0 (every hop rewinds its cache), so generation continues with
exactly the output an uninterrupted run would give.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from inferencemesh.client.route import (
    BanList,
    KnownProviders,
    Providers,
    by_span,
    entry_address,
    plan_over,
    probe,
)
from inferencemesh.client.runtime import MeshRuntime, gather
from inferencemesh.compute.span import format_block_range
from inferencemesh.p2p.errors import NoRouteError
from inferencemesh.p2p.identity import short_id
from inferencemesh.p2p.records import ProviderEntry
from inferencemesh.p2p.routing import Route
from inferencemesh.protocol.frames import encode_message
from inferencemesh.protocol.messages import (
    BadRequest,
    CacheFull,
    LengthExceeded,
    MessageKind,
    NextHopFailed,
    WorkerError,
    step_result_metadata,
)
from inferencemesh.transport.errors import TransportError

log = logging.getLogger(__name__)

# A lone step's wait encodes the next step's message after this long: while the hops compute, not
# right after the send, when the first hop is often waking up on the caller's CPU.
ENCODE_AHEAD_AFTER_S = 0.001


class SessionFailed(RuntimeError):
    """The session could not continue: no route, or too many failed recoveries."""


class StepStalled(TimeoutError):
    """A step got no result in time; ``silent`` are the hops that did not answer a probe either."""

    def __init__(self, message: str, silent: list[bytes]) -> None:
        super().__init__(message)
        self.silent = silent


@dataclass(frozen=True)
class SessionOptions:
    # A step without a result after this long makes the client probe every hop, and again every
    # step_timeout_s while it waits: hops that do not answer are dead or hung (failover at once); if all
    # answer, they are busy (a long prefill) and the client waits on. A probe is a PING that the worker's
    # event loop answers while its compute thread works (the loop computes inline at most 50 ms per
    # turn, see server/scheduler.py), so probing early costs a few small messages.
    # A dead or frozen hop fails its probe within the client's QUIC dead-peer timeout (0.25 s, see
    # runtime.py); probe_timeout_s only bounds the wait on a live process whose event loop is stuck.
    step_timeout_s: float = 0.2
    max_step_wait_s: float = 120.0  # ... but never longer than this for one step
    # A hop whose transport is alive but which misses this many PINGs in a row while a step waits is
    # hung (its event loop is stuck): fail over rather than wait for max_step_wait_s.
    hung_after_missed_probes: int = 4
    open_timeout_s: float = 5.0
    # Inputs longer than this go down the chain in chunks of this many tokens, sent back to back, so
    # the hops compute different chunks at the same time (pipeline parallelism; a 512-token prompt
    # over 3 CPU workers: 1.28 s -> 0.80 s). Each chunk's forward streams all of a span's weights, so
    # chunks much smaller than this cost more than they overlap; 0: one step.
    prefill_chunk: int = 128
    probe_timeout_s: float = 1.0
    max_failovers: int = 5


@dataclass
class OpenHop:
    entry: ProviderEntry
    address: tuple[str, int]
    token: bytes

    @property
    def peer_id(self) -> bytes:
        return self.entry.peer_id

    def describe(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id.hex(),
            "layers": format_block_range(self.entry.span_start, self.entry.span_end),
            "address": self.entry.addresses[0],
        }


@dataclass
class PendingStep:
    """A step on its way down the chain (RemoteSession.begin_step)."""

    hidden: torch.Tensor
    step_ids: list[int]
    result: concurrent.futures.Future[Any]  # the last chunk's STEP_RESULT, or the first error
    started: float  # time.perf_counter() when its first frame was sent


@dataclass
class _EncodedAhead:
    """The message of a session's next decode step, encoded before its token is known
    (RemoteSession.encode_next); begin_step copies the token's hidden state into ``buffer``."""

    position: int
    hops: list[OpenHop]  # the route it was encoded for (the session's hops list, by identity)
    step_id: int
    result: concurrent.futures.Future[Any]
    send: Callable[[], None]  # its send to the first hop, made ready (Endpoint.prepare_send)
    buffer: torch.Tensor  # [1, hidden_size]

    def fits(self, hidden: torch.Tensor, position: int, hops: list[OpenHop]) -> bool:
        buffer = self.buffer
        return (
            position == self.position
            and hops is self.hops
            and hidden.shape == buffer.shape
            and hidden.dtype == buffer.dtype
        )


@dataclass
class Failover:
    cause: str
    banned: list[bytes]
    detection_s: float  # from sending the step to knowing it failed
    recovery_s: float  # from then to the replayed step's result


@dataclass
class RemoteSession:
    runtime: MeshRuntime
    model_id: str
    num_blocks: int
    max_length: int
    bans: BanList
    known: KnownProviders  # the client's latest lookup, shared by its sessions
    options: SessionOptions = field(default_factory=SessionOptions)
    session_id: bytes = field(default_factory=lambda: os.urandom(16))
    hops: list[OpenHop] = field(default_factory=list)
    position: int = 0
    last_chain_s: float = 0.0  # the last step's time in the swarm: sent to the first hop -> result
    last_step_id: int = 0  # its id (of its last chunk), as the workers' step_times name it
    failovers: list[Failover] = field(default_factory=list)
    steps_encoded_ahead: int = 0  # steps that went out in a message encoded before they began
    _inputs: list[torch.Tensor] = field(default_factory=list)
    _ahead: _EncodedAhead | None = None
    _providers: Providers = field(default_factory=dict)  # from the last DHT lookup

    # ------------------------------------------------------------------ opening and closing
    async def open(self) -> None:
        await self._connect(reason="open")

    async def _connect(self, reason: str) -> None:
        """Plans a route and opens sessions on its hops, keeping hops that are already open."""
        refusals: list[str] = []  # why workers turned the session down, for the error if no route is left
        for _attempt in range(self.options.max_failovers + 1):
            try:
                route = await self._plan()
            except NoRouteError as exc:
                refused = f" (refused by {'; '.join(refusals)})" if refusals else ""
                raise SessionFailed(
                    f"no route through the swarm: no live worker serves layers "
                    f"{_layer_ranges(exc.missing_blocks)} of {self.model_id}{refused}; start workers for "
                    "them or check the bootstrap address"
                ) from exc
            try:
                await self._open_hops(route)
                log.info(
                    "route (%s): %s",
                    reason,
                    " -> ".join(
                        f"{short_id(h.peer_id)}[{format_block_range(h.entry.span_start, h.entry.span_end)}]"
                        for h in self.hops
                    ),
                )
                return
            except (WorkerError, TransportError) as exc:
                peer = getattr(exc, "peer_id", None)
                if isinstance(exc, BadRequest) and not isinstance(exc, CacheFull):
                    raise
                if peer is not None:
                    self.bans.ban(peer, f"could not open a session: {exc}")
                    refusals.append(f"{short_id(peer)}: {exc}")
        raise SessionFailed(
            f"could not open a session on any route after {self.options.max_failovers + 1} tries"
        )

    async def _plan(self) -> Route:
        """A route over the providers known from the last lookup (this session's, or for a new session
        the client's if recent: a failover usually finds the replacement among them, without waiting
        on a DHT that may have lost nodes too), else over a fresh lookup."""
        if not self._providers:
            self._providers = self.known.fresh()
        if self._providers:
            try:
                return await plan_over(
                    self.runtime, self.model_id, self.num_blocks, self._providers, self.bans, self.max_length
                )
            except NoRouteError:
                log.info("no route over the known workers: looking the DHT up again")
        providers = await self.known.look_up(self.runtime)
        # Known workers the lookup missed stay candidates (a probe tells whether they still live).
        self._providers = by_span(self._providers, providers, num_blocks=self.num_blocks)
        return await plan_over(
            self.runtime, self.model_id, self.num_blocks, self._providers, self.bans, self.max_length
        )

    async def _open_hops(self, route: Route) -> None:
        kept = {(h.peer_id, h.entry.span_start, h.entry.span_end): h for h in self.hops}
        new_hops: list[OpenHop] = []
        opening = []
        for hop in route.hops:
            existing = kept.pop((hop.peer_id, hop.start, hop.end), None)
            if existing is not None:
                new_hops.append(existing)
                continue
            open_hop = OpenHop(hop.entry, entry_address(hop.entry), os.urandom(16))
            new_hops.append(open_hop)
            opening.append(self._open_one(open_hop))
        results = await asyncio.gather(*opening, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        opened = [h for h in new_hops if h not in self.hops]
        if failures:
            await self._close_hops(opened)
            raise failures[0]
        await self._close_hops(list(kept.values()))  # hops the new route no longer uses
        self.hops = new_hops

    async def _open_one(self, hop: OpenHop) -> None:
        metadata = {
            "model_id": self.model_id,
            "session_id": self.session_id,
            "token": hop.token,
            "max_length": self.max_length,
        }
        await self.runtime.request(
            hop.peer_id, hop.address, MessageKind.OPEN_SESSION, metadata, self.options.open_timeout_s
        )

    async def close(self) -> None:
        self._drop_ahead()
        await self._close_hops(self.hops)
        self.hops = []

    async def _close_hops(self, hops: list[OpenHop]) -> None:
        async def close_one(hop: OpenHop) -> None:
            metadata = {"session_id": self.session_id, "token": hop.token}
            try:
                await self.runtime.request(hop.peer_id, hop.address, MessageKind.CLOSE_SESSION, metadata, 1.0)
            except (WorkerError, TransportError) as exc:
                log.debug("closing the session on %s: %s", short_id(hop.peer_id), exc)

        await asyncio.gather(*(close_one(hop) for hop in hops))

    # ------------------------------------------------------------------ steps
    def begin_step(self, hidden: torch.Tensor, burst: tuple[int, int] | None = None) -> PendingStep:
        """Sends ``hidden`` [tokens, hidden_size] down the chain now, from the calling thread; wait for
        its output with :func:`finish_steps`. ``burst`` (id, size): this decode step is one of ``size``
        that the caller sends together for other sessions too, to be computed as one batch."""
        if self.position + hidden.shape[0] > self.max_length:
            raise LengthExceeded(
                f"{hidden.shape[0]} more tokens at position {self.position} "
                f"exceed max_length {self.max_length}"
            )
        ahead = self._ahead
        if ahead is not None and burst is None and ahead.fits(hidden, self.position, self.hops):
            self._ahead = None
            return self._send_ahead(ahead, hidden)
        return self._launch(hidden, self.position, burst)

    def encode_next(self, pending: PendingStep) -> None:
        """Encodes the message of the decode step expected after ``pending`` (one token, at the next
        position, on the same route) while ``pending`` computes in the swarm: begin_step then copies
        the token's hidden state in and sends it. Encoding it on the step's way took ~110 us, cold
        after the LM head (traced, docs/benchmarks.md). Any other step drops it."""
        position = self.position + pending.hidden.shape[0]
        if self._ahead is not None or not self.hops or position >= self.max_length:
            return
        buffer = torch.empty(1, pending.hidden.shape[1], dtype=pending.hidden.dtype)
        step_id, result = self.runtime.new_step()
        metadata = self._step_metadata(position, partial=False)
        frame = encode_message(MessageKind.STEP, step_id, metadata, [buffer])
        # Its result: the last position's hidden state (last_only), one row.
        result_metadata = step_result_metadata(self.session_id, position + 1)
        self.runtime.expect_result(step_id, result_metadata, buffer.dtype, tuple(buffer.shape))
        send = self._prepare_first(frame, result)
        self._ahead = _EncodedAhead(position, self.hops, step_id, result, send, buffer)

    def _send_ahead(self, ahead: _EncodedAhead, hidden: torch.Tensor) -> PendingStep:
        started = time.perf_counter()
        ahead.buffer.copy_(hidden)
        ahead.send()
        self.steps_encoded_ahead += 1
        return PendingStep(hidden, [ahead.step_id], ahead.result, started)

    def _drop_ahead(self) -> None:
        """Forgets the step encoded ahead: its id is older than any step sent since."""
        if self._ahead is not None:
            self.runtime.forget_step(self._ahead.step_id)
            self._ahead = None

    def _step_metadata(
        self, position: int, partial: bool, burst: tuple[int, int] | None = None
    ) -> dict[str, Any]:
        """A STEP's metadata for the first hop: the session, its token and the rest of the chain."""
        metadata = {
            "client": self.runtime.identity.peer_id,
            "session_id": self.session_id,
            "token": self.hops[0].token,
            "position": position,
            "last_only": True,
            "partial": partial,
            "chain": [[h.peer_id, h.entry.addresses[0], h.token] for h in self.hops[1:]],
        }
        if burst is not None:
            metadata["burst"] = list(burst)
        return metadata

    def _launch(
        self, hidden: torch.Tensor, position: int, burst: tuple[int, int] | None = None
    ) -> PendingStep:
        """Hands the step's frames to QUIC (any thread); a failed send fails the step's result.

        A long input goes as several steps of at most ``prefill_chunk`` tokens, sent back to back: while
        the second hop computes the first chunk, the first hop computes the second (pipeline
        parallelism). Only the last chunk's result comes back; an error on any chunk fails the step.
        """
        started = time.perf_counter()
        self._drop_ahead()
        chunk = self.options.prefill_chunk
        # No split for a step of one chunk: a torch call costs ~50 us right after the LM head.
        pieces = hidden.split(chunk) if 0 < chunk < hidden.shape[0] else (hidden,)
        step_ids: list[int] = []
        results: list[concurrent.futures.Future[Any]] = []
        for index, piece in enumerate(pieces):
            step_id, result = self.runtime.new_step()
            step_ids.append(step_id)
            results.append(result)
            metadata = self._step_metadata(position + index * chunk, index < len(pieces) - 1, burst)
            self._send_first(encode_message(MessageKind.STEP, step_id, metadata, [piece]), results[-1])
        for partial in results[:-1]:  # partial steps never succeed; their errors fail the step
            partial.add_done_callback(functools.partial(_fail_with, results[-1]))
        return PendingStep(hidden, step_ids, results[-1], started)

    def _send_first(self, frame: Any, result: concurrent.futures.Future[Any]) -> None:
        """Hands a STEP to QUIC for the first hop. A failed send fails the step's ``result``; one that
        flow control holds up forever ends in a failover like a result that never comes (the wait
        probes the hops)."""
        self._prepare_first(frame, result)()

    def _prepare_first(self, frame: Any, result: concurrent.futures.Future[Any]) -> Callable[[], None]:
        """:meth:`_send_first` made ready, to be called once (Endpoint.prepare_send)."""
        assert self.runtime.endpoint is not None
        first = self.hops[0]
        fail = functools.partial(_fail, result)
        return self.runtime.endpoint.prepare_send(first.peer_id, first.address, frame, fail)

    def _output(self, pending: PendingStep, message: Any) -> torch.Tensor:
        self.last_chain_s = time.perf_counter() - pending.started
        self.last_step_id = pending.step_ids[-1]
        return message.tensors[0]

    def _finish(self, pending: PendingStep, message: Any) -> torch.Tensor:
        """Books a step whose result came."""
        self._forget(pending)
        return self._book(pending, self._output(pending, message))

    def _book(self, pending: PendingStep, output: torch.Tensor) -> torch.Tensor:
        self._inputs.append(pending.hidden)
        self.position += pending.hidden.shape[0]
        return output

    def _forget(self, pending: PendingStep) -> None:
        for step_id in pending.step_ids:
            self.runtime.forget_step(step_id)

    async def _complete(self, pending: PendingStep) -> torch.Tensor:
        """A step without a result in step_timeout_s, or a failed one: waits on with probes, fails over."""
        try:
            message = await self._await_result(pending.result, pending.started)
        except (WorkerError, TransportError, TimeoutError) as exc:
            self._forget(pending)
            detection_s = time.perf_counter() - pending.started
            return self._book(pending, await self._recover(exc, pending.hidden, detection_s=detection_s))
        return self._finish(pending, message)

    async def _send_step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Sends ``hidden`` down the chain and returns the last position's output (a replay)."""
        pending = self._launch(hidden, position)
        try:
            return self._output(pending, await self._await_result(pending.result, pending.started))
        finally:
            self._forget(pending)

    async def _await_result(self, result: concurrent.futures.Future[Any], started: float) -> Any:
        """The step's result message; probes the hops every step_timeout_s while it waits."""
        waiting = asyncio.wrap_future(result)
        missed: dict[bytes, int] = {}
        while True:
            await asyncio.wait((waiting,), timeout=self.options.step_timeout_s)
            if result.done():
                return result.result()
            waited = time.perf_counter() - started
            silent = await self._silent_hops(missed)
            if result.done():
                return result.result()  # it came (or failed) while the hops were being probed
            if silent:
                raise StepStalled(f"no step result after {waited:.2f} s", silent)
            if waited > self.options.max_step_wait_s:
                raise StepStalled(f"no step result after {waited:.0f} s; every hop answers", [])
            log.debug("step pending for %.1f s; every hop answers probes: waiting on", waited)

    async def _silent_hops(self, missed: dict[bytes, int] | None = None) -> list[bytes]:
        """Hops that neither answer a PING within probe_timeout_s nor send any packet meanwhile.

        A worker whose compute saturates its machine may answer PINGs late, but its QUIC I/O thread
        still acknowledges our packets at once; only a process that is gone or frozen falls silent.
        """
        timeout = self.options.probe_timeout_s
        probes = (probe(self.runtime, hop.entry, self.model_id, timeout) for hop in self.hops)
        rtts = await asyncio.gather(*probes)
        assert self.runtime.endpoint is not None
        missed = {} if missed is None else missed
        silent = []
        for hop, rtt in zip(self.hops, rtts, strict=True):
            if rtt is not None:
                missed[hop.peer_id] = 0
                continue
            missed[hop.peer_id] = missed.get(hop.peer_id, 0) + 1
            stats = self.runtime.endpoint.peer_stats(hop.peer_id)
            gone = stats is None or not stats.connected or stats.silent_s >= timeout
            if gone or missed[hop.peer_id] >= self.options.hung_after_missed_probes:
                silent.append(hop.peer_id)
        return silent

    async def _recover(self, error: BaseException, hidden: torch.Tensor, detection_s: float) -> torch.Tensor:
        """Bans the failed hop(s), re-routes, replays the history plus this step; bounded attempts."""
        while True:
            if isinstance(error, (BadRequest, LengthExceeded)) and not isinstance(error, CacheFull):
                raise error  # the request itself is wrong: another worker would refuse it too
            if len(self.failovers) >= self.options.max_failovers:
                raise SessionFailed(f"gave up after {len(self.failovers)} failovers; last error: {error}")
            started = time.perf_counter()
            banned = await self._blame(error)
            replay_sent = None
            try:
                await self._connect(reason=f"failover after {type(error).__name__}")
                replay = torch.cat([*self._inputs, hidden]) if self._inputs else hidden
                replay_sent = time.perf_counter()
                output = await self._send_step(replay, 0)
            except (WorkerError, TransportError, TimeoutError) as exc:
                failed_at = time.perf_counter()
                self._note(Failover(repr(error), banned, detection_s, failed_at - started), exc)
                # The next failover's detection: how long the replay ran before it failed (a refusal
                # while opening the new route is known at once).
                error, detection_s = exc, failed_at - replay_sent if replay_sent is not None else 0.0
                continue
            self._note(Failover(repr(error), banned, detection_s, time.perf_counter() - started))
            return output

    def _note(self, failover: Failover, failed: BaseException | None = None) -> None:
        self.failovers.append(failover)
        log.warning(
            "failover %d: %s, detected after %.3f s; banned %s; %s in %.3f s",
            len(self.failovers),
            failover.cause,
            failover.detection_s,
            ", ".join(short_id(p) for p in failover.banned) or "nobody",
            "recovered" if failed is None else f"the new route failed too ({failed!r})",
            failover.recovery_s,
        )

    async def _blame(self, error: BaseException) -> list[bytes]:
        """Which hops to ban for ``error``: the one named by the error, or those that stopped answering."""
        if isinstance(error, NextHopFailed) and error.failed_peer is not None:
            culprits = [error.failed_peer]
        elif isinstance(error, (WorkerError, TransportError)) and error.peer_id is not None:
            culprits = [error.peer_id]
        elif isinstance(error, StepStalled) and error.silent:
            culprits = error.silent
        else:
            culprits = await self._silent_hops() or [h.peer_id for h in self.hops]
        for peer in culprits:
            self.bans.ban(peer, repr(error))
        self.hops = [h for h in self.hops if h.peer_id not in culprits]
        return culprits


def finish_steps(
    runtime: MeshRuntime, steps: Sequence[tuple[RemoteSession, PendingStep]]
) -> list[torch.Tensor]:
    """The outputs of steps begun with RemoteSession.begin_step, waited for on the calling thread.

    Steps whose result is not there within step_timeout_s, or that failed, go on together on the
    runtime's loop (probes, failover), so a dead hop shared by several sessions is handled for all
    of them at once."""
    if not steps:
        return []
    timeout = steps[0][0].options.step_timeout_s
    if len(steps) == 1:  # a lone step waits on its own future: wait() builds a waiter and an event
        session, pending = steps[0]
        if not _wait(pending.result, ENCODE_AHEAD_AFTER_S):
            session.encode_next(pending)
            left = timeout - ENCODE_AHEAD_AFTER_S
            deadline = time.monotonic() + left
            message = runtime.await_result(pending.step_ids[-1], pending.result, left)
            if message is not None:
                return [session._finish(pending, message)]
            _wait(pending.result, deadline - time.monotonic())
    else:
        concurrent.futures.wait([pending.result for _, pending in steps], timeout)
    outputs: list[torch.Tensor | None] = []
    slow: list[int] = []
    for index, (session, pending) in enumerate(steps):
        if pending.result.done() and pending.result.exception() is None:
            outputs.append(session._finish(pending, pending.result.result()))
        else:
            outputs.append(None)
            slow.append(index)
    if slow:
        completed = runtime.call(gather(steps[i][0]._complete(steps[i][1]) for i in slow))
        for index, output in zip(slow, completed, strict=True):
            outputs[index] = output
    return outputs  # type: ignore[return-value]


def _wait(result: concurrent.futures.Future[Any], timeout: float) -> bool:
    """Waits up to ``timeout`` for ``result``; whether it is done (a result, an error or cancelled)."""
    try:
        result.exception(timeout)
    except (TimeoutError, concurrent.futures.CancelledError):
        pass
    return result.done()


def _fail_with(result: concurrent.futures.Future[Any], other: concurrent.futures.Future[Any]) -> None:
    """Fails ``result`` with the error of the ``other`` operation, if it failed."""
    if not other.cancelled() and other.exception() is not None:
        _fail(result, other.exception())  # type: ignore[arg-type]


def _fail(result: concurrent.futures.Future[Any], error: BaseException) -> None:
    if result.done():
        return
    try:
        result.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass  # the result came meanwhile on another thread


def _layer_ranges(blocks: list[int]) -> str:
    """0-based block indices as 1-based layer ranges, e.g. [10, 11, 12, 20] -> "11-13, 21"."""
    ranges: list[list[int]] = []
    for block in sorted(blocks):
        if ranges and block == ranges[-1][1] + 1:
            ranges[-1][1] = block
        else:
            ranges.append([block, block])
    return ", ".join(f"{a + 1}-{b + 1}" if a != b else f"{a + 1}" for a, b in ranges)
