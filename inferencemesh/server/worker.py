"""A worker's life: load its span, open the QUIC endpoint, join the DHT, announce, serve, drain.

Ports: the DHT listens on UDP ``port``, the QUIC data plane on UDP ``port + 1``; workers on one host
started with ports 10 apart never collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import torch

from inferencemesh import _core
from inferencemesh.compute.config import ModelConfig
from inferencemesh.compute.identity import model_id as compute_model_id
from inferencemesh.compute.span import Span, format_block_range, parse_block_range
from inferencemesh.p2p.address import format_host_port
from inferencemesh.p2p.announcer import Announcer
from inferencemesh.p2p.identity import Identity
from inferencemesh.p2p.node import DHTNode
from inferencemesh.protocol.frames import FrameLimits
from inferencemesh.protocol.pinning import enable_cuda_pinning
from inferencemesh.server.config import WorkerConfig
from inferencemesh.server.scheduler import ComputeScheduler, measure_throughput
from inferencemesh.server.service import WorkerService
from inferencemesh.server.sessions import SessionRegistry
from inferencemesh.transport.config import TransportConfig
from inferencemesh.transport.endpoint import Endpoint

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def data_plane_port(port: int) -> int:
    return port + 1


def load_identity(path: str) -> Identity:
    return Identity.load_or_create(path) if path else Identity.generate()


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.identity = load_identity(config.identity)
        self.span: Span | None = None
        self.service: WorkerService | None = None
        self.endpoint: Endpoint | None = None
        self.dht: DHTNode | None = None
        self.announcer: Announcer | None = None
        self.scheduler: ComputeScheduler | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        model = ModelConfig.load(config.model_path)
        start, end = parse_block_range(config.layers, model.num_layers)
        log.info("worker %s (peer id %s)", self.identity.short_id, self.identity.peer_id_hex)
        loaded_at = time.perf_counter()
        span = await asyncio.to_thread(
            Span.load, config.model_path, start, end, dtype=DTYPES[config.dtype], device=config.device
        )
        model_id = await asyncio.to_thread(compute_model_id, config.model_path)
        self.span = span
        log.info(
            "loaded blocks %s of %d (%.1f MiB, %s on %s) in %.1f s; model %s",
            format_block_range(start, end),
            model.num_layers,
            span.nbytes() / 2**20,
            config.dtype,
            config.device,
            time.perf_counter() - loaded_at,
            model_id,
        )
        decode_tps, prefill_tps = await asyncio.to_thread(measure_throughput, span)
        log.info("span throughput: decode %.0f tok/s, prefill %.0f tok/s", decode_tps, prefill_tps)

        sessions = SessionRegistry(span.cache_manager(config.cache_bytes), config.max_session_length)
        transport = TransportConfig()
        self.endpoint = await Endpoint.start(
            self.identity.private_seed,
            config.host,
            data_plane_port(config.port),
            transport,
            receive_pool(span, transport),
        )
        self.scheduler = ComputeScheduler(
            span,
            max_batch=config.max_batch,
            prefill_chunk=config.prefill_chunk,
            inline_budget_s=config.inline_compute_ms / 1e3,
            gather_s=config.batch_gather_ms / 1e3,
            decode_row_s=1 / decode_tps,
            prefill_token_s=1 / prefill_tps,
            busy=self.endpoint.set_busy,
        )
        self.service = WorkerService(
            span=span,
            model_id=model_id,
            sessions=sessions,
            scheduler=self.scheduler,
            endpoint=self.endpoint,
            max_request_tokens=config.max_request_tokens,
            frame_limits=FrameLimits(max_frame_size=transport.max_frame_size),
            busy_poll_s=config.busy_poll_us * 1e-6,
        )
        self.endpoint.set_handler(self.service.handle)
        self.dht = await DHTNode.start(
            self.identity, host=config.host, port=config.port, bootstrap=config.bootstrap
        )
        address = format_host_port(self.announce_host, config.announce_port or data_plane_port(config.port))
        self.announcer = Announcer(
            self.dht,
            self.identity,
            model_id=model_id,
            total_blocks=model.num_layers,
            span_start=start,
            span_end=end,
            addresses=[address],
            dtype=config.dtype,
            decode_tps=decode_tps * span.num_blocks,
            prefill_tps=prefill_tps * span.num_blocks,
            free_cache_tokens=sessions.caches.free_tokens,
            ttl=config.announce_ttl,
        )
        report = await self.announcer.start()
        log.info(
            "serving on quic %s, dht %s; announced %d keys (%d stored nowhere yet; %d to store again "
            "in the background, where some closest DHT node did not answer)",
            address,
            self.dht.address,
            len(report.accepted),
            len(report.failed_keys),
            len(report.keys_to_repair),
        )
        self._maintenance = asyncio.create_task(self._maintain())

    @property
    def announce_host(self) -> str:
        if self.config.announce_host:
            return self.config.announce_host
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.config.host, self.config.host)

    async def _maintain(self) -> None:
        """Frees idle sessions, refreshes the announced load and free cache, logs throughput."""
        assert self.service and self.announcer and self.scheduler
        service, stats = self.service, self.scheduler.stats
        last_log = time.monotonic()
        logged_tokens = 0
        while True:
            await asyncio.sleep(min(5.0, self.config.stats_interval))
            service.sessions.expire_idle(self.config.session_idle_timeout)
            caches = service.sessions.caches
            self.announcer.update(
                free_cache_tokens=caches.free_tokens,
                load=self.scheduler.queued / max(1, self.config.max_batch),
            )
            if time.monotonic() - last_log >= self.config.stats_interval:
                window = time.monotonic() - last_log
                tokens = stats.decode_tokens + stats.prefill_tokens
                log.info(
                    "%d sessions, %.1f tok/s over the last %.0f s (decode %.0f tok/s in compute, "
                    "%.1f steps per batch), cache %.1f of %.1f MiB reserved, %d errors",
                    len(service.sessions),
                    (tokens - logged_tokens) / window,
                    window,
                    stats.decode_tokens_per_s,
                    stats.decode_tokens / max(1, stats.decode_batches),
                    caches.reserved_bytes / 2**20,
                    caches.budget_bytes / 2**20,
                    service.errors,
                )
                last_log, logged_tokens = time.monotonic(), tokens

    async def stop(self) -> None:
        """Withdraws the DHT entries, finishes in-flight steps (bounded), then closes everything."""
        log.info("shutting down: withdrawing DHT entries and draining")
        if self.service is not None:
            self.service.draining = True
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
        drain = self.config.drain_timeout
        deadline = time.monotonic() + drain
        # The withdrawal, and storing it again where a closest node missed it, go on while the
        # steps in flight finish: both within the drain timeout.
        withdrawal = asyncio.ensure_future(self._withdraw(drain)) if self.announcer is not None else None
        while self.service is not None and self.service.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if withdrawal is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(withdrawal, timeout=max(0.0, deadline - time.monotonic()))
        if self.service is not None:
            if self.service.in_flight:
                log.warning("%d steps still in flight at shutdown: they fail", self.service.in_flight)
            self.service.sessions.close_all()
        if self.endpoint is not None:
            await self.endpoint.close()
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)
        if self.dht is not None:
            await self.dht.close()
        self._stopped.set()
        log.info("stopped")

    async def _withdraw(self, settle_within: float) -> None:
        assert self.announcer is not None
        report = await self.announcer.stop(settle_within=settle_within)
        log.info(
            "withdrew %d keys from the DHT (%d missed by some closest node: retried while draining)",
            len(report.accepted),
            len(report.keys_to_repair),
        )

    async def run_until_signalled(self) -> None:
        """Serves until SIGINT or SIGTERM, then stops cleanly."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.create_task(self.start())
        signalled = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a failed start raises here
                await signalled
            else:
                log.info("signal received while starting")
                starting.cancel()
        finally:
            signalled.cancel()
            await self.stop()


def receive_pool(span: Span, transport: TransportConfig) -> _core.BufferPool | None:
    """For a span on a GPU, a receive pool whose large buffers are page-locked, so that big inputs
    (long prompts) reach the GPU by DMA without a staging copy; None (the endpoint's own pool) on a CPU."""
    if span.device.type != "cuda":
        return None
    pool = _core.BufferPool(transport.pool_bytes)
    enable_cuda_pinning(pool)
    log.info("receive buffers of 1 MiB and more are page-locked for copies to %s", span.device)
    return pool
