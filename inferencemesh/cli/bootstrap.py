"""``python -m inferencemesh bootstrap``: run a DHT node that workers and clients join."""

from __future__ import annotations

import argparse
import asyncio
import signal

from inferencemesh.cli.logs import setup_logging
from inferencemesh.p2p.address import PeerAddress, parse_peer_address
from inferencemesh.p2p.errors import AddressError, IdentityError
from inferencemesh.p2p.identity import Identity
from inferencemesh.p2p.node import DHTNode


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bootstrap",
        help="run a DHT bootstrap node for a swarm",
        description="Run a DHT node (UDP) that workers and clients join. Prints its peer id and the "
        "multiaddr to give others, then serves until interrupted.",
    )
    parser.add_argument("--port", type=int, default=9000, help="UDP port of the DHT (default: 9000)")
    parser.add_argument(
        "--host",
        default="0.0.0.0",
        help="address to bind (default: 0.0.0.0, all IPv4 interfaces; :: for IPv6)",
    )
    parser.add_argument(
        "--identity",
        metavar="PATH",
        help="Ed25519 key file, created (mode 0600) when missing; without it the node "
        "gets a new peer id at every start",
    )
    parser.add_argument(
        "--peers",
        nargs="*",
        default=[],
        metavar="ADDR",
        help="other bootstrap nodes to join: HOST:PORT or /ip4/IP/udp/PORT[/p2p/PEERID]",
    )
    parser.add_argument(
        "--status-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how often to print the number of known nodes (default: 60)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        identity = Identity.load_or_create(args.identity) if args.identity else Identity.generate()
        peers = [parse_peer_address(text) for text in args.peers]
    except (IdentityError, AddressError) as exc:
        print(f"error: {exc}")
        return 2
    try:
        asyncio.run(_serve(identity, args.host, args.port, peers, args.status_interval))
    except OSError as exc:
        print(f"error: cannot listen on UDP {args.host}:{args.port}: {exc}")
        return 1
    return 0


async def _serve(identity: Identity, host: str, port: int, peers: list[PeerAddress], interval: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"peer id {identity.peer_id_hex}", flush=True)
    node = await DHTNode.start(identity, host=host, port=port, bootstrap=peers)
    print(f"bootstrap node ready: {node.multiaddr}", flush=True)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not stopped.done():
            done, _ = await asyncio.wait({stopped}, timeout=interval)
            if not done:
                print(f"{len(node.contacts())} nodes in the routing table", flush=True)
    finally:
        await node.close()
        print("bootstrap node stopped", flush=True)
