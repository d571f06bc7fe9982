import pytest

from inferencemesh.p2p.address import (
    PeerAddress,
    format_host_port,
    parse_host_port,
    parse_peer_address,
    to_multiaddr,
)
from inferencemesh.p2p.errors import AddressError

PEER = "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9000", PeerAddress("127.0.0.1", 9000)),
        ("[::1]:9000", PeerAddress("::1", 9000)),
        ("seed.example.org:31337", PeerAddress("seed.example.org", 31337)),
        ("/ip4/127.0.0.1/udp/9000", PeerAddress("127.0.0.1", 9000)),
        ("/ip4/127.0.0.1/tcp/9000", PeerAddress("127.0.0.1", 9000)),
        ("/ip6/::1/udp/9000", PeerAddress("::1", 9000)),
        ("/dns4/localhost/udp/9000", PeerAddress("localhost", 9000)),
        (f"/ip4/10.0.0.2/tcp/31337/p2p/{PEER}", PeerAddress("10.0.0.2", 31337, bytes.fromhex(PEER))),
        (f"  /ip4/10.0.0.2/udp/1/p2p/{PEER.upper()}  ", PeerAddress("10.0.0.2", 1, bytes.fromhex(PEER))),
    ],
)
def test_accepted_bootstrap_addresses(text, expected):
    assert parse_peer_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "", "127.0.0.1", "127.0.0.1:", ":9000", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:90x",
        "::1:9000", "[::1]9000", "[127.0.0.1]:9000", "bad_host!:9000",
        "/ip4/127.0.0.1", "/ip4/127.0.0.1/quic/9000", "/ip4/::1/udp/9000", "/ip6/127.0.0.1/udp/9000",
        "/ip4/300.1.1.1/udp/9000", "/ip4/127.0.0.1/udp/9000/p2p", "/ip4/127.0.0.1/udp/9000/p2p/xyz",
        "/ip4/127.0.0.1/udp/9000/ipfs/" + PEER, "/unix/tmp/sock/udp/1",
    ],
)
def test_rejected_bootstrap_addresses_raise_address_error(text):
    with pytest.raises(AddressError):
        parse_peer_address(text)


def test_formatting_round_trips():
    assert format_host_port("::1", 5) == "[::1]:5"
    assert parse_host_port(format_host_port("::1", 5)) == ("::1", 5)
    peer = bytes.fromhex(PEER)
    for host in ["127.0.0.1", "::1", "seed.example.org"]:
        assert parse_peer_address(to_multiaddr(host, 9000, peer)) == PeerAddress(host, 9000, peer)
