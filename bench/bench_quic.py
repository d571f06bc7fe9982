"""QUIC data plane through the Python API, side by side with a plain TCP baseline in the same run.

A server process (this script with --serve) runs a QUIC endpoint and an asyncio TCP server
(TCP_NODELAY) that answer the same message pattern: a request of N bytes, the same bytes back (echo), or a
small acknowledgement for 64 MiB transfers. The client measures request/response RTT median and p99 for
8 KiB and 64 KiB, 64 MiB transfer throughput, and CPU microseconds per message (client + server process
CPU time over the measured interval). With --cpp it also runs the C++-only program bench/cpp/quic_bench.

    python bench/bench_quic.py [--iterations 2000] [--bulk 4] [--cpp build/bench/bench/cpp/quic_bench]
        [--io-thread-reads]   # the I/O thread reads the socket (TransportConfig.loop_reads_socket=False)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from inferencemesh import _core
from inferencemesh.transport import Endpoint, TransportConfig

CPU_QUERY = 9  # frame kind asking the server for its process CPU time
BULK_THRESHOLD = 1 << 20  # requests above this get a small acknowledgement instead of an echo
LENGTH = struct.Struct("<Q")


def small_frame(kind: int, metadata: dict) -> _core.EncodedFrame:
    return _core.encode_frame(kind, 0, msgpack.packb(metadata), [])


# --- server -----------------------------------------------------------------------------------------


def payload_config(udp_payload: int, loop_reads_socket: bool) -> TransportConfig:
    """Packets of ``udp_payload`` bytes between the two processes (on loopback, where the endpoint would
    otherwise use loopback_udp_payload)."""
    return TransportConfig(
        max_udp_payload=udp_payload, loopback_udp_payload=udp_payload, loop_reads_socket=loop_reads_socket
    )


async def serve(udp_payload: int, loop_reads_socket: bool) -> None:
    config = payload_config(udp_payload, loop_reads_socket)
    endpoint = await Endpoint.start(Ed25519PrivateKey.generate().private_bytes_raw(), "127.0.0.1", 0, config)
    ack = small_frame(1, {"ok": True}).to_bytes()

    def handle(peer_id: bytes, buffer: _core.Buffer) -> object:
        if len(buffer) > BULK_THRESHOLD:
            return ack
        if _core.decode_frame(buffer).kind == CPU_QUERY:
            return small_frame(CPU_QUERY, {"cpu": time.process_time()})
        return buffer

    endpoint.set_handler(handle)

    handlers: set[asyncio.Task] = set()

    async def tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                (n,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
                if n == 0:
                    payload = struct.pack("<d", time.process_time())
                    writer.write(LENGTH.pack(len(payload)) + payload)
                    continue
                body = await reader.readexactly(n)
                writer.write(LENGTH.pack(len(ack)) + ack if n > BULK_THRESHOLD else LENGTH.pack(n) + body)
        except asyncio.IncompleteReadError:
            writer.close()

    tcp = await asyncio.start_server(tcp_client, "127.0.0.1", 0)
    tcp_port = tcp.sockets[0].getsockname()[1]
    print(f"READY {endpoint.port} {tcp_port} {endpoint.peer_id.hex()}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.wait(handlers, timeout=5)  # the client has disconnected: they end on EOF
    await endpoint.close()


# --- client -----------------------------------------------------------------------------------------


def summarize(name: str, rtts: list[float], cpu_us: float) -> str:
    rtts.sort()
    p99 = rtts[min(len(rtts) - 1, len(rtts) * 99 // 100)]
    return f"{name:<32} {statistics.median(rtts) * 1e6:10.1f} {p99 * 1e6:10.1f} {cpu_us:12.1f}"


class QuicClient:
    def __init__(self, endpoint: Endpoint, peer_id: bytes, port: int) -> None:
        self.endpoint, self.peer_id, self.address = endpoint, peer_id, ("127.0.0.1", port)

    async def call(self, frame: object) -> object:
        return await self.endpoint.request(self.peer_id, self.address, frame, timeout=60)

    async def server_cpu(self) -> float:
        reply = await self.call(small_frame(CPU_QUERY, {}))
        return msgpack.unpackb(_core.decode_frame(reply).metadata)["cpu"]


class TcpClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def call(self, payload: bytes) -> bytes:
        self.writer.write(LENGTH.pack(len(payload)))
        self.writer.write(payload)
        (n,) = LENGTH.unpack(await self.reader.readexactly(LENGTH.size))
        return await self.reader.readexactly(n)

    async def server_cpu(self) -> float:
        return struct.unpack("<d", await self.call(b""))[0]


async def measure(
    client: QuicClient | TcpClient, message: object, iterations: int
) -> tuple[list[float], float]:
    for _ in range(max(10, iterations // 10)):  # warm-up: connection, windows, caches
        await client.call(message)
    server0, client0 = await client.server_cpu(), time.process_time()
    rtts = []
    for _ in range(iterations):
        start = time.perf_counter()
        await client.call(message)
        rtts.append(time.perf_counter() - start)
    cpu = (time.process_time() - client0) + (await client.server_cpu() - server0)
    return rtts, cpu / iterations * 1e6


async def bulk(client: QuicClient | TcpClient, message: object, size: int, count: int) -> float:
    await client.call(message)
    start = time.perf_counter()
    for _ in range(count):
        await client.call(message)
    return size * count / (time.perf_counter() - start) / 1e6


async def run_client(args: argparse.Namespace) -> None:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--udp-payload", str(args.udp_payload)]
        + (["--io-thread-reads"] if args.io_thread_reads else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    _, quic_port, tcp_port, peer_hex = server.stdout.readline().split()
    config = payload_config(args.udp_payload, not args.io_thread_reads)
    endpoint = await Endpoint.start(Ed25519PrivateKey.generate().private_bytes_raw(), "127.0.0.1", 0, config)
    quic = QuicClient(endpoint, bytes.fromhex(peer_hex), int(quic_port))
    reader, writer = await asyncio.open_connection("127.0.0.1", int(tcp_port))
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tcp = TcpClient(reader, writer)

    header = "case (python api, server in another process)"
    print(f"{header:<32} {'median_us':>10} {'p99_us':>10} {'cpu_us/msg':>12}")
    for kib in (8, 64):
        payload = os.urandom(kib << 10)
        frame = _core.encode_frame(1, 0, b"", [payload])
        frame_bytes = frame.to_bytes()
        iterations = args.iterations if kib == 8 else args.iterations // 2
        rtts, cpu = await measure(quic, frame, iterations)
        print(summarize(f"quic python echo {kib} KiB", rtts, cpu))
        rtts, cpu = await measure(tcp, frame_bytes, iterations)
        print(summarize(f"tcp  python echo {kib} KiB", rtts, cpu))

    big = os.urandom(64 << 20)
    big_frame = _core.encode_frame(1, 0, b"", [big])
    print(f"quic python 64 MiB transfer: {await bulk(quic, big_frame, len(big), args.bulk):.0f} MB/s")
    print(
        f"tcp  python 64 MiB transfer: {await bulk(tcp, big_frame.to_bytes(), len(big), args.bulk):.0f} MB/s"
    )
    stats = endpoint.stats()
    print(
        f"client endpoint: gso={stats.gso} gro={stats.gro} socket_drops={stats.socket_drops} "
        f"sendmsg_calls={stats.sendmsg_calls} datagrams_sent={stats.datagrams_sent}"
    )
    writer.close()
    await writer.wait_closed()
    await endpoint.close()
    server.stdin.close()
    server.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--iterations", type=int, default=2000, help="round trips per 8 KiB case (64 KiB: half)"
    )
    parser.add_argument("--bulk", type=int, default=4, help="64 MiB transfers to time")
    parser.add_argument(
        "--udp-payload",
        type=int,
        default=1452,
        help="UDP payload of the packets (above 1452: a trusted path; the endpoint's default to loopback "
        "peers is 16000, loopback_udp_payload)",
    )
    parser.add_argument("--cpp", help="path of the C++-only benchmark program to run afterwards")
    parser.add_argument(
        "--io-thread-reads",
        action="store_true",
        help="both endpoints with TransportConfig(loop_reads_socket=False): the I/O thread reads the socket",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.udp_payload, not args.io_thread_reads))
        return
    asyncio.run(run_client(args))
    if args.cpp:
        print()
        cmd = [args.cpp, str(args.iterations), str(args.bulk), str(args.udp_payload)]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
