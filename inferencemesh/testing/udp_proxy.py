"""A fault-injecting UDP proxy: what tc netem would do, in user space (netem is missing on these kernels).

    with UdpProxy(("127.0.0.1", 4001), Faults(delay_s=0.02, loss=0.05), seed=7) as proxy:
        ...  # peers send to proxy.address instead of 127.0.0.1:4001

Every client source address gets its own upstream socket, so the upstream sees one stable address per
client: QUIC tolerates an address change only within a connection, and two clients multiplexed onto one
socket would look like one peer changing its mind. Each datagram, in both directions, is dropped with
probability ``loss``, otherwise held for ``delay_s`` plus a uniform ``jitter_s``, and with probability
``reorder`` held ``reorder_s`` longer so that the datagrams behind it overtake it. The decisions come
from one generator seeded by ``seed``, drawn in arrival order. ``faults`` may be replaced while the
proxy runs, e.g. with ``Faults(loss=1.0)`` to cut the peer off and with ``Faults()`` to reconnect it;
``upstream`` may be set after construction, until :meth:`start` (for an upstream that must be told the
proxy's port before its own is known).
"""

from __future__ import annotations

import heapq
import ipaddress
import random
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType

Address = tuple[str, int]
MAX_DATAGRAM = 65535
IDLE_WAIT_S = 0.05  # longest select() wait: bounds how long close() waits for the thread


@dataclass(frozen=True)
class Faults:
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    reorder: float = 0.0
    reorder_s: float = 0.005

    def __post_init__(self) -> None:
        for name in ("delay_s", "jitter_s", "reorder_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("loss", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")


@dataclass
class ProxyStats:
    forwarded: int = 0
    dropped: int = 0
    reordered: int = 0


class UdpProxy:
    def __init__(
        self,
        upstream: Address,
        faults: Faults | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
    ) -> None:
        self.upstream = upstream
        self.faults = faults or Faults()
        self.stats = ProxyStats()
        self._family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        self._random = random.Random(seed)
        self._selector = selectors.DefaultSelector()
        self._listen = self._socket(host, port)
        self._selector.register(self._listen, selectors.EVENT_READ, None)
        self._upstreams: dict[Address, socket.socket] = {}
        # (due time, arrival number, socket to send from, datagram, destination)
        self._held: list[tuple[float, int, socket.socket, bytes, Address]] = []
        self._arrivals = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"udp-proxy-{self.port}", daemon=True)

    def _socket(self, host: str, port: int) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((host, port))
        sock.setblocking(False)
        return sock

    @property
    def address(self) -> Address:
        host, port = self._listen.getsockname()[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> UdpProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join()
        self._selector.close()
        for sock in [self._listen, *self._upstreams.values()]:
            sock.close()

    def __enter__(self) -> UdpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ the proxy thread
    def _run(self) -> None:
        while not self._closing.is_set():
            wait = IDLE_WAIT_S
            if self._held:
                wait = min(wait, max(0.0, self._held[0][0] - time.monotonic()))
            for key, _ in self._selector.select(wait):
                self._receive(key.fileobj, key.data)  # type: ignore[arg-type]
            self._release(time.monotonic())

    def _receive(self, sock: socket.socket, client: Address | None) -> None:
        """Reads every datagram waiting on ``sock``: the listening socket (``client`` None) or the
        upstream socket of ``client``."""
        while True:
            try:
                data, source = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. an ICMP error queued on the socket: the datagram is simply lost
            if client is None:
                self._hold(self._upstream_for(source[:2]), data, self.upstream)
            else:
                self._hold(self._listen, data, client)

    def _upstream_for(self, client: Address) -> socket.socket:
        sock = self._upstreams.get(client)
        if sock is None:
            sock = self._socket(self._listen.getsockname()[0], 0)
            self._selector.register(sock, selectors.EVENT_READ, client)
            self._upstreams[client] = sock
        return sock

    def _hold(self, sock: socket.socket, data: bytes, destination: Address) -> None:
        faults, chance = self.faults, self._random
        self._arrivals += 1
        if faults.loss and chance.random() < faults.loss:
            self.stats.dropped += 1
            return
        hold = faults.delay_s + (chance.uniform(0.0, faults.jitter_s) if faults.jitter_s else 0.0)
        if faults.reorder and chance.random() < faults.reorder:
            hold += faults.reorder_s
            self.stats.reordered += 1
        heapq.heappush(self._held, (time.monotonic() + hold, self._arrivals, sock, data, destination))

    def _release(self, now: float) -> None:
        while self._held and self._held[0][0] <= now:
            _, _, sock, data, destination = heapq.heappop(self._held)
            try:
                sock.sendto(data, destination)
                self.stats.forwarded += 1
            except OSError:
                self.stats.dropped += 1  # the destination is gone (or its buffer full): a lost datagram
