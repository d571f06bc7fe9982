"""The fault-injecting UDP proxy, between real UDP sockets on loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from inferencemesh.testing.udp_proxy import Address, Faults, UdpProxy


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def client_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    return sock


def address(sock: socket.socket) -> Address:
    host, port = sock.getsockname()
    return host, port


def receive_all(sock: socket.socket, quiet_s: float = 0.3) -> list[bytes]:
    """Datagrams until none came for ``quiet_s``."""
    sock.settimeout(quiet_s)
    received = []
    try:
        while True:
            received.append(sock.recv(2048))
    except TimeoutError:
        return received


def test_each_client_gets_its_own_upstream_socket_and_replies_find_their_way_back(
    upstream: socket.socket,
) -> None:
    with UdpProxy(address(upstream)) as proxy:
        first, second = client_socket(), client_socket()
        first.sendto(b"one", proxy.address)
        data, seen_first = upstream.recvfrom(2048)
        assert data == b"one"
        second.sendto(b"two", proxy.address)
        data, seen_second = upstream.recvfrom(2048)
        assert data == b"two" and seen_second != seen_first
        upstream.sendto(b"to second", seen_second)
        upstream.sendto(b"to first", seen_first)
        assert second.recvfrom(2048) == (b"to second", proxy.address)
        assert first.recvfrom(2048) == (b"to first", proxy.address)
        first.sendto(b"again", proxy.address)
        assert upstream.recvfrom(2048) == (b"again", seen_first)  # a stable address per client
        first.close()
        second.close()
    assert proxy.stats.forwarded == 5


def dropped_by(seed: int, upstream: socket.socket, count: int = 200) -> set[int]:
    with UdpProxy(address(upstream), Faults(loss=0.3), seed=seed) as proxy:
        sender = client_socket()
        for number in range(count):
            sender.sendto(number.to_bytes(2, "big"), proxy.address)
        arrived = {int.from_bytes(d, "big") for d in receive_all(upstream)}
        sender.close()
        assert proxy.stats.dropped == count - len(arrived)
    return set(range(count)) - arrived


def test_loss_is_seeded(upstream: socket.socket) -> None:
    lost = dropped_by(1, upstream)
    assert 30 <= len(lost) <= 90  # ~30% of 200
    assert dropped_by(1, upstream) == lost
    assert dropped_by(2, upstream) != lost


def test_total_loss_cuts_the_peer_off_until_the_faults_are_lifted(upstream: socket.socket) -> None:
    with UdpProxy(address(upstream), Faults(loss=1.0)) as proxy:
        sender = client_socket()
        sender.sendto(b"lost", proxy.address)
        assert receive_all(upstream) == []
        proxy.faults = Faults()
        sender.sendto(b"through", proxy.address)
        assert upstream.recv(2048) == b"through"
        sender.close()


def test_reordering_delivers_everything_out_of_order(upstream: socket.socket) -> None:
    with UdpProxy(address(upstream), Faults(reorder=0.3, reorder_s=0.02), seed=3) as proxy:
        sender = client_socket()
        for number in range(50):
            sender.sendto(number.to_bytes(2, "big"), proxy.address)
        arrived = [int.from_bytes(d, "big") for d in receive_all(upstream)]
        sender.close()
    assert sorted(arrived) == list(range(50))
    assert arrived != sorted(arrived)
    assert proxy.stats.reordered > 0


def test_delay_holds_every_datagram_in_both_directions(upstream: socket.socket) -> None:
    with UdpProxy(address(upstream), Faults(delay_s=0.05, jitter_s=0.01)) as proxy:
        sender = client_socket()
        started = time.monotonic()
        sender.sendto(b"ping", proxy.address)
        data, via = upstream.recvfrom(2048)
        assert data == b"ping"
        upstream.sendto(b"pong", via)
        assert sender.recv(2048) == b"pong"
        assert time.monotonic() - started >= 0.1
        sender.close()


@pytest.mark.parametrize(
    "faults",
    [dict(loss=1.5), dict(reorder=-0.1), dict(delay_s=-1.0), dict(jitter_s=-0.5), dict(reorder_s=-1)],
)
def test_impossible_faults_are_refused(faults: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Faults(**faults)
