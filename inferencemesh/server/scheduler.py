"""The compute loop of a worker: one thread that runs the span for every session.

Decode steps (one token) of all sessions waiting at the same moment run as one batched forward
(continuous batching: sessions join and leave between batches). Prefills are cut into chunks, and
pending decodes run between two chunks, so a long prompt never starves the sessions that are
generating. asyncio code submits work with :meth:`ComputeScheduler.run` and awaits the result.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from inferencemesh.compute.kv_cache import SessionCache
from inferencemesh.compute.span import Span


@dataclass
class _Job:
    cache: SessionCache
    hidden: torch.Tensor  # [tokens, hidden_size]
    future: asyncio.Future[torch.Tensor]
    loop: asyncio.AbstractEventLoop
    done_tokens: int = 0
    outputs: list[torch.Tensor] = field(default_factory=list)


@dataclass
class ComputeStats:
    decode_tokens: int = 0
    decode_batches: int = 0
    decode_seconds: float = 0.0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0


def _deliver(job: _Job, result: torch.Tensor | None, error: BaseException | None) -> None:
    def settle() -> None:
        if job.future.done():  # the requester gave up (timeout, shutdown)
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    job.loop.call_soon_threadsafe(settle)


class ComputeScheduler:
    def __init__(self, span: Span, *, max_batch: int, prefill_chunk: int) -> None:
        self.span = span
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.stats = ComputeStats()
        self._decodes: collections.deque[_Job] = collections.deque()
        self._prefills: collections.deque[_Job] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="inferencemesh-compute", daemon=True)
        self._thread.start()

    async def run(self, cache: SessionCache, hidden: torch.Tensor) -> torch.Tensor:
        """Runs ``hidden`` [tokens, hidden_size] through the span, continuing ``cache``."""
        loop = asyncio.get_running_loop()
        job = _Job(cache, hidden, loop.create_future(), loop)
        with self._wake:
            if self._stopping:
                raise RuntimeError("the compute loop has stopped")
            (self._decodes if hidden.shape[0] == 1 else self._prefills).append(job)
            self._wake.notify()
        return await job.future

    @property
    def queued(self) -> int:
        return len(self._decodes) + len(self._prefills)

    def stop(self) -> None:
        """Stops after the work already queued; returns when the thread has ended."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._decodes and not self._prefills and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._decodes and not self._prefills:
                    return
                batch = self._take_decode_batch()
                prefill = self._prefills[0] if self._prefills else None
            if batch:
                self._run_decode(batch)
            if prefill is not None:
                self._run_prefill_chunk(prefill)

    def _take_decode_batch(self) -> list[_Job]:
        batch: list[_Job] = []
        later: list[_Job] = []
        sessions: set[int] = set()
        while self._decodes and len(batch) < self.max_batch:
            job = self._decodes.popleft()
            # A session appears at most once per forward; its next step waits for the next batch.
            (later if id(job.cache) in sessions else batch).append(job)
            sessions.add(id(job.cache))
        self._decodes.extendleft(reversed(later))
        return batch

    def _run_decode(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            hidden = torch.cat([job.hidden for job in batch]) if len(batch) > 1 else batch[0].hidden
            output = self.span.decode(hidden, [job.cache for job in batch])
        except Exception as exc:
            for job in batch:
                _deliver(job, None, exc)
            return
        self.stats.decode_seconds += time.perf_counter() - started
        self.stats.decode_tokens += len(batch)
        self.stats.decode_batches += 1
        for row, job in enumerate(batch):
            _deliver(job, output[row : row + 1], None)

    def _run_prefill_chunk(self, job: _Job) -> None:
        started = time.perf_counter()
        chunk = job.hidden[job.done_tokens : job.done_tokens + self.prefill_chunk]
        try:
            job.outputs.append(self.span.prefill(chunk, job.cache))
        except Exception as exc:
            self._finish_prefill(job)
            _deliver(job, None, exc)
            return
        self.stats.prefill_seconds += time.perf_counter() - started
        self.stats.prefill_tokens += chunk.shape[0]
        job.done_tokens += chunk.shape[0]
        if job.done_tokens == job.hidden.shape[0]:
            self._finish_prefill(job)
            output = job.outputs[0] if len(job.outputs) == 1 else torch.cat(job.outputs)
            _deliver(job, output, None)

    def _finish_prefill(self, job: _Job) -> None:
        with self._wake:
            self._prefills.remove(job)


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
