"""The compute loop of a worker: where and when each session's work runs through the span.

Work is submitted on the event loop thread (:meth:`ComputeScheduler.submit`) and its result handed to
a callback on that thread. Decode steps (one token) of all sessions that arrived in the same event
loop turn run as one batched forward (continuous batching: sessions join and leave between batches).

When it runs: a decode batch waits for more steps while they keep arriving (no gap longer than
``gather_s``) from open sessions that submitted work in the last ACTIVE_S, up to one batch's compute time.
A client stepping many sessions sends their steps as a burst; without the wait the first one or two
would run alone and split the burst into small batches at every hop, each streaming all weights.
A lone session never waits: its decode runs as soon as it arrives, not even at the end of the loop
turn.

Where it runs: small work runs inline on the event loop thread when the compute thread is idle. A
decode step then costs no thread hand-off; two thread wake-ups (to the compute thread and back) cost
~0.1 ms each on a loaded machine, which is most of a hop's overhead. Work expected to hold the loop
longer than ``inline_budget_s`` (so the loop keeps answering probes and DHT requests), or arriving
while the compute thread is busy, goes to the compute thread. That thread cuts prefills into chunks
and runs waiting decodes between two chunks, so a long prompt never starves sessions that generate.

Callers submit at most one job per session at a time (the service orders each session's steps), so a
session never appears twice in one batch and its jobs run in the order they were submitted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from inferencemesh.compute.kv_cache import SessionCache
from inferencemesh.compute.span import Span

log = logging.getLogger(__name__)

ACTIVE_S = 1.0  # a session that submitted work this recently is expected to send more
# Inline work expected to take this long lends the socket to the transport's I/O thread meanwhile
# (``busy``); shorter work keeps it: lending and taking it back cost ~20 us of the step's way.
LEND_SOCKET_S = 0.010

# done(output, None) or done(None, error), called on the event loop thread.
Done = Callable[[torch.Tensor | None, BaseException | None], None]


@dataclass(frozen=True)
class Burst:
    """Decode steps a client sent together, to be computed as one batch: ``size`` steps share ``key``."""

    key: Hashable
    size: int


@dataclass
class _Gathering:
    """The steps of a burst that have arrived so far."""

    count: int = 0
    # When the latest arrived, or when the loop came back from computing other work (no step can
    # arrive while it computes inline, so that time does not count as waiting).
    since: float = 0.0


@dataclass(slots=True)
class _Job:
    cache: SessionCache
    hidden: torch.Tensor  # [tokens, hidden_size]
    done: Done
    burst: Burst | None = None
    out: torch.Tensor | None = None  # where a decode that runs alone writes its output
    written: Callable[[], None] | None = None  # called once it did, before anything else
    arrived: float = 0.0  # time.perf_counter() when a decode was submitted
    done_tokens: int = 0
    outputs: list[torch.Tensor] = field(default_factory=list)


@dataclass
class ComputeStats:
    decode_tokens: int = 0
    decode_batches: int = 0
    decode_seconds: float = 0.0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    inline_jobs: int = 0  # decode batches and prefills run on the event loop thread

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0


class ComputeScheduler:
    def __init__(
        self,
        span: Span,
        *,
        max_batch: int,
        prefill_chunk: int,
        inline_budget_s: float,
        gather_s: float,
        decode_row_s: float,
        prefill_token_s: float,
        busy: Callable[[bool], None] | None = None,
    ) -> None:
        """Binds to the running event loop (create it there). ``decode_row_s`` and ``prefill_token_s``
        seed the cost estimates that decide what runs inline (e.g. from :func:`measure_throughput`);
        measured times refine them as work runs. ``busy(True)`` is called before work expected to
        take LEND_SOCKET_S or longer runs on the loop's thread, and ``busy(False)`` after (the
        worker's endpoint reads the socket on its I/O thread meanwhile: ``Endpoint.set_busy``)."""
        self.span = span
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.inline_budget_s = inline_budget_s
        self.gather_s = gather_s
        self.stats = ComputeStats()
        self._busy = busy
        self._lent: Callable[[bool], None] | None = None  # busy, when it was called for the work running now
        self._decode_row_s = decode_row_s
        self._prefill_token_s = prefill_token_s
        self._loop = asyncio.get_running_loop()
        # Loop thread only: decodes waiting to run (each knows when it arrived), their bursts, when the
        # latest arrived, the next flush, and when each recent session (by id of its cache) last
        # submitted work.
        self._arrived: list[_Job] = []
        self._bursts: dict[Burst, _Gathering] = {}  # of the steps in _arrived
        self._last_arrival = 0.0
        self._pending_flush: asyncio.Handle | None = None  # call_soon or call_later of _flush
        self._recent: dict[int, tuple[weakref.ref[SessionCache], float]] = {}
        self._pruned_at = 0.0
        self._decode_batch_s = decode_row_s
        self._inline_spent = 0.0  # inline compute time in this loop turn
        self._inline_started = 0.0
        self._new_turn_pending = False  # _new_turn is scheduled
        self._decodes: collections.deque[_Job] = collections.deque()  # for the compute thread
        self._prefills: collections.deque[_Job] = collections.deque()
        self._wake = threading.Condition()
        self._computing = threading.Lock()  # held while the span runs, by either thread
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="inferencemesh-compute", daemon=True)
        self._thread.start()

    def submit(
        self,
        cache: SessionCache,
        hidden: torch.Tensor,
        done: Done,
        burst: Burst | None = None,
        out: torch.Tensor | None = None,
        rows: int | None = None,
        written: Callable[[], None] | None = None,
    ) -> None:
        """Runs ``hidden`` [tokens, hidden_size] through the span, continuing ``cache``; event loop only.
        ``burst``: the decode step is one of a burst, to be batched with the rest of it. ``out``: for a
        decode, a tensor like ``hidden`` the output goes to if the step runs in a batch of its own
        (see Span.decode; ``done`` then gets ``out`` itself), else it gets a view of the batch's output.
        ``rows``: ``hidden.shape[0]``, if the caller knows it (a torch call costs a few us, cold).
        ``written``: called (on the computing thread) as soon as a forward wrote its output into
        ``out``, before the scheduler's bookkeeping and ``done``: a worker sends the output on from
        there. Called exactly when ``done`` gets ``out`` itself: never if the step ran in a batch
        with others, or failed (also if ``written`` raised: ``done`` then gets its error)."""
        if self._stopping:
            raise RuntimeError("the compute loop has stopped")
        tokens = hidden.shape[0] if rows is None else rows
        if tokens == 1 and burst is None and self._alone(cache) and self._start_inline(self._decode_row_s):
            self._decode_alone(cache, hidden, done, out, written)
            return
        job = _Job(cache, hidden, done, burst, out, written)
        now = time.perf_counter()
        others_active = self._others_active(id(cache), now)
        self._note_active(cache, now)
        if tokens == 1:
            job.arrived = self._last_arrival = now
            if burst is None and self._pending_flush is None and not self._arrived and not others_active:
                # A lone session (one that others left lately): no other step could join its batch.
                self._run_batch([job])
                return
            self._arrived.append(job)
            if burst is not None:
                gathering = self._bursts.setdefault(burst, _Gathering())
                gathering.count += 1
                gathering.since = job.arrived
                if gathering.count == burst.size:  # its last step: run the burst now
                    self._flush()
                    return
            if self._pending_flush is None:
                # Wait for the rest of this loop turn at least: other sessions' decodes may join.
                self._flush_later()
            return
        if self._start_inline(tokens * self._prefill_token_s):
            try:
                output, error = self._prefill(job, tokens)
            finally:
                self._end_inline()
            _settle(job.done, output, error)
            self._budget_again_next_turn()
            return
        self._enqueue(self._prefills, [job])

    def serves_alone(self, cache: SessionCache) -> bool:
        """Whether ``cache``'s session is the only one this worker serves now: nothing queued, and
        no other session submitted work in the last ACTIVE_S; event loop only."""
        return not self.queued and not self._others_active(id(cache), time.perf_counter())

    def _alone(self, cache: SessionCache) -> bool:
        """Whether ``cache``'s session is the only one this worker knows of and nothing waits: its
        decode could join no batch. The usual case of a lone session, told in few steps; one that
        others left lately (still in ``_recent``) takes the general way of ``submit``."""
        recent = self._recent
        return len(recent) == 1 and id(cache) in recent and self._pending_flush is None and not self._arrived

    def _decode_alone(
        self,
        cache: SessionCache,
        hidden: torch.Tensor,
        done: Done,
        out: torch.Tensor | None,
        written: Callable[[], None] | None,
    ) -> None:
        """A lone session's decode step, inline (the span taken by ``_start_inline``): the forward
        first, its bookkeeping after its output went on. Before the forward every statement counts,
        the caches being cold after the other workers' forwards: from submit's call to the forward,
        the general way took 26-29 us, this one 15-17 (traced, docs/benchmarks.md)."""
        try:
            output, error = self._forward(hidden, [cache], out, written)
        finally:
            self._end_inline()
        self._note_active(cache, self._inline_started)
        self._last_arrival = self._inline_started
        _settle(done, output, error)
        self._budget_again_next_turn()

    def _note_active(self, cache: SessionCache, now: float) -> None:
        """``cache``'s session submitted work at ``now``."""
        key = id(cache)
        known = self._recent.get(key)
        # Its weakref is kept across steps; an id of a freed cache may have come back for a new one.
        ref = known[0] if known is not None and known[0]() is cache else weakref.ref(cache)
        self._recent[key] = (ref, now)

    @property
    def queued(self) -> int:
        return len(self._arrived) + len(self._decodes) + len(self._prefills)

    def stop(self) -> None:
        """Stops after the work already queued; returns when the thread has ended (any thread)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    # ------------------------------------------------------------------ event loop side
    def _flush(self) -> None:
        """Runs the decodes that arrived and need not wait longer; (re)schedules itself for the rest."""
        if self._pending_flush is not None:
            self._pending_flush.cancel()  # a no-op when that is what runs now
            self._pending_flush = None
        now = time.perf_counter()
        ready: list[_Job] = []
        held: list[_Job] = []  # steps of bursts still arriving
        for job in self._arrived:
            (held if self._still_arriving(job, now) else ready).append(job)
        wait = self._gather_wait(ready, now)
        if wait > 0 or not ready:
            retry = self._held_wait(held, now)
            if ready:
                retry = min(retry, wait)
            if retry < float("inf"):
                self._flush_later(max(0.0, retry))
            return
        self._arrived = held
        for job in ready:
            if job.burst is not None:
                self._bursts[job.burst].count -= 1
                if self._bursts[job.burst].count <= 0:
                    del self._bursts[job.burst]
        for start in range(0, len(ready), self.max_batch):
            self._run_batch(ready[start : start + self.max_batch])
        if held:
            now = time.perf_counter()
            for burst in {job.burst for job in held if job.burst is not None}:
                self._bursts[burst].since = now
            if self._pending_flush is None:
                self._flush_later(self._held_wait(held, now))

    def _run_batch(self, batch: list[_Job]) -> None:
        """Computes a decode batch inline if it may, else queues it for the compute thread."""
        if not self._start_inline(len(batch) * self._decode_row_s):
            self._enqueue(self._decodes, batch)
            return
        try:
            output, error = self._decode(batch)
        finally:
            self._end_inline()
        for row, job in enumerate(batch):
            _settle(job.done, _row(output, row, len(batch)), error)
        self._budget_again_next_turn()

    def _flush_later(self, delay: float | None = None) -> None:
        """Schedules the next flush: at the end of this loop turn (None), or in ``delay`` seconds."""
        if self._pending_flush is not None:
            self._pending_flush.cancel()
        if delay is None:
            self._pending_flush = self._loop.call_soon(self._flush)
        else:
            self._pending_flush = self._loop.call_later(delay, self._flush)

    def _still_arriving(self, job: _Job, now: float) -> bool:
        """Whether ``job`` waits for the rest of its burst: at most one batch's compute time after the
        latest of its steps arrived."""
        if job.burst is None:
            return False
        gathering = self._bursts[job.burst]
        return gathering.count < job.burst.size and now < gathering.since + self._decode_batch_s

    def _held_wait(self, held: list[_Job], now: float) -> float:
        """Seconds until the first of the ``held`` steps stops waiting for its burst (inf: none held)."""
        bursts = {job.burst for job in held if job.burst is not None}
        return min((self._bursts[b].since + self._decode_batch_s - now for b in bursts), default=float("inf"))

    def _start_inline(self, expected_s: float) -> bool:
        """Whether work expected to take ``expected_s`` may run on the loop thread now; if so, the span
        is taken until :meth:`_end_inline`. Inline work of one loop turn stays within the budget, so
        the loop answers probes between turns."""
        if self._inline_spent + expected_s > self.inline_budget_s:
            return False
        if not self._computing.acquire(blocking=False):
            return False  # the compute thread is busy: queue behind its work
        if self._busy is not None and expected_s >= LEND_SOCKET_S:
            self._lent = self._busy
            self._lent(True)
        self._inline_started = time.perf_counter()
        return True

    def _end_inline(self) -> None:
        if self._lent is not None:
            self._lent(False)
            self._lent = None
        self._computing.release()
        self.stats.inline_jobs += 1
        self._inline_spent += time.perf_counter() - self._inline_started

    def _budget_again_next_turn(self) -> None:
        """After inline work's results went on (``done``: a step's output sent), not before: the
        ``call_soon`` costs ~15 us of a hop when it runs between the forward and the send, cold
        (traced, docs/benchmarks.md)."""
        if not self._new_turn_pending:
            self._new_turn_pending = True
            self._loop.call_soon(self._new_turn)

    def _new_turn(self) -> None:
        self._inline_spent = 0.0
        self._new_turn_pending = False

    def _others_active(self, key: int, now: float) -> bool:
        """Whether a session other than ``key`` may send a step soon."""
        if len(self._recent) == 1 and key in self._recent:  # a lone session: no other to look at
            return False
        if now - self._pruned_at > ACTIVE_S:  # forget sessions gone quiet, once per ACTIVE_S
            self._recent = {
                other: entry for other, entry in self._recent.items() if now - entry[1] < ACTIVE_S
            }
            self._pruned_at = now
        return self._expects_others(now, {key})

    def _expects_others(self, now: float, excluding: set[int]) -> bool:
        """Whether a session other than ``excluding`` (ids of caches) submitted work in the last
        ACTIVE_S and is still open. A closed session's cache is freed: without that check, a session
        opened right after another closed waited for the closed one's steps at every hop (1.3 ms a hop)."""
        return any(
            key not in excluding and now - at < ACTIVE_S and _open(cache)
            for key, (cache, at) in self._recent.items()
        )

    def _gather_wait(self, ready: list[_Job], now: float) -> float:
        """How much longer the ``ready`` decodes should wait for more to join them (0: run now).

        Steps of complete bursts run at once (along with any loose steps that came meanwhile); loose
        steps alone wait while steps of other recently active sessions keep arriving."""
        if not ready or self.gather_s <= 0 or any(job.burst is not None for job in ready):
            return 0.0
        if len(ready) >= self.max_batch or not self._expects_others(now, {id(job.cache) for job in ready}):
            return 0.0
        quiet_until = self._last_arrival + self.gather_s
        deadline = ready[0].arrived + self._decode_batch_s
        return max(0.0, min(quiet_until, deadline) - now)

    def _enqueue(self, queue: collections.deque[_Job], jobs: list[_Job]) -> None:
        with self._wake:
            queue.extend(jobs)
            self._wake.notify()

    def _deliver(self, job: _Job, output: torch.Tensor | None, error: BaseException | None) -> None:
        self._loop.call_soon_threadsafe(_settle, job.done, output, error)

    # ------------------------------------------------------------------ compute thread side
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._decodes and not self._prefills and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._decodes and not self._prefills:
                    return
                batch = [self._decodes.popleft() for _ in range(min(self.max_batch, len(self._decodes)))]
                prefill = self._prefills[0] if self._prefills else None
            with self._computing:
                if batch:
                    output, error = self._decode(batch)
                    for row, job in enumerate(batch):
                        self._deliver(job, _row(output, row, len(batch)), error)
                if prefill is not None:
                    self._run_prefill_chunk(prefill)

    def _run_prefill_chunk(self, job: _Job) -> None:
        output, error = self._prefill(job, self.prefill_chunk)
        if error is None and job.done_tokens < job.hidden.shape[0]:
            return  # more chunks to go
        with self._wake:
            self._prefills.remove(job)
        self._deliver(job, output, error)

    # ------------------------------------------------------------------ the span (either thread)
    def _decode(self, batch: list[_Job]) -> tuple[torch.Tensor | None, BaseException | None]:
        if len(batch) == 1:
            lone = batch[0]
            return self._forward(lone.hidden, [lone.cache], lone.out, lone.written)
        return self._forward(torch.cat([job.hidden for job in batch]), [job.cache for job in batch])

    def _forward(
        self,
        hidden: torch.Tensor,
        caches: list[SessionCache],
        out: torch.Tensor | None = None,
        written: Callable[[], None] | None = None,
    ) -> tuple[torch.Tensor | None, BaseException | None]:
        """One decode forward of ``hidden`` [rows, hidden_size] (a row per cache); ``out``, ``written``:
        a lone step's (see submit)."""
        started = time.perf_counter()
        try:
            output = self.span.decode(hidden, caches, out)
        except Exception as exc:
            return None, exc
        elapsed = time.perf_counter() - started  # the forward's own time: what PING's step_times report
        if written is not None and out is not None:
            try:
                written()
            except Exception as exc:  # the step fails as a whole (reported as an internal error)
                return None, exc
        rows = len(caches)
        self._decode_row_s = _ema(self._decode_row_s, elapsed / rows)
        self._decode_batch_s = _ema(self._decode_batch_s, elapsed)
        self.stats.decode_seconds += elapsed
        self.stats.decode_tokens += rows
        self.stats.decode_batches += 1
        for cache in caches:
            cache.last_decode_s = elapsed
        return output, None

    def _prefill(self, job: _Job, tokens: int) -> tuple[torch.Tensor | None, BaseException | None]:
        """Runs the next ``tokens`` of ``job``; returns the whole output once the last chunk ran."""
        started = time.perf_counter()
        chunk = job.hidden[job.done_tokens : job.done_tokens + tokens]
        try:
            if job.done_tokens == 0:  # a job that cannot finish must not leave a partial prefill
                job.cache.check_room(job.hidden.shape[0])
            job.outputs.append(self.span.prefill(chunk, job.cache))
        except Exception as exc:
            return None, exc
        elapsed = time.perf_counter() - started
        self._prefill_token_s = _ema(self._prefill_token_s, elapsed / chunk.shape[0])
        self.stats.prefill_seconds += elapsed
        self.stats.prefill_tokens += chunk.shape[0]
        job.done_tokens += chunk.shape[0]
        if job.done_tokens < job.hidden.shape[0]:
            return None, None
        return (job.outputs[0] if len(job.outputs) == 1 else torch.cat(job.outputs)), None


def _settle(done: Done, output: torch.Tensor | None, error: BaseException | None) -> None:
    try:
        done(output, error)
    except Exception:
        log.exception("a compute result could not be handled")


def _row(output: torch.Tensor | None, row: int, rows: int) -> torch.Tensor | None:
    """A batch's output for its ``row``: the output itself in a batch of one (a slice is a torch
    call, which costs ~10-40 us after a forward has left the caches cold)."""
    if output is None or rows == 1:
        return output
    return output[row : row + 1]


def _ema(average: float, sample: float, weight: float = 0.1) -> float:
    return average + weight * (sample - average)


def measure_throughput(span: Span, prompt_tokens: int = 64, decode_steps: int = 8) -> tuple[float, float]:
    """(decode, prefill) tokens/s of this span on this machine, for the worker's DHT announcement."""
    cache = span.cache_manager(budget_bytes=1 << 62).allocate(
        "throughput-probe", prompt_tokens + decode_steps + 1
    )
    hidden = torch.zeros(prompt_tokens, span.config.hidden_size, dtype=span.dtype, device=span.device)
    span.prefill(hidden[:1], cache)  # warm-up
    started = time.perf_counter()
    span.prefill(hidden[1:], cache)
    prefill_tps = (prompt_tokens - 1) / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(decode_steps):
        span.decode(hidden[:1], [cache])
    decode_tps = decode_steps / (time.perf_counter() - started)
    return decode_tps, prefill_tps


def _open(cache: weakref.ref[SessionCache]) -> bool:
    """Whether the session of a weakly held cache is still open (its manager has not freed it)."""
    live = cache()
    return live is not None and not live.freed
