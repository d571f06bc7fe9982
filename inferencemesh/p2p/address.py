"""Peer addresses: ``HOST:PORT`` text and the multiaddr form used by seeds.

Accepted forms of a bootstrap address::

    127.0.0.1:9000   [::1]:9000   seed.example.org:9000
    /ip4/127.0.0.1/udp/9000   /ip4/127.0.0.1/tcp/9000   /ip6/::1/udp/9000   /dns4/host/udp/9000
    any of the multiaddrs followed by /p2p/PEERID (64 hex characters)

The DHT runs over UDP; ``/tcp/PORT`` is accepted because seed lists write it that way, and the port
is used as the UDP port. A ``/p2p/PEERID`` suffix pins the peer: joining checks that the node
answering at that address has the matching DHT id.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from inferencemesh.p2p.errors import AddressError
from inferencemesh.p2p.identity import IdentityError, parse_peer_id

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_HOST_PROTOCOLS = {"ip4", "ip6", "dns", "dns4", "dns6"}
_PORT_PROTOCOLS = {"udp", "tcp"}


@dataclass(frozen=True)
class PeerAddress:
    host: str
    port: int
    peer_id: bytes | None = None

    def __str__(self) -> str:
        return format_host_port(self.host, self.port)


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets so the port stays unambiguous."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def to_multiaddr(host: str, port: int, peer_id: bytes | None = None) -> str:
    """The multiaddr of a DHT node (UDP), optionally pinned to its peer id."""
    try:
        proto = "ip6" if ipaddress.ip_address(host).version == 6 else "ip4"
    except ValueError:
        proto = "dns"
    text = f"/{proto}/{host}/udp/{port}"
    return f"{text}/p2p/{peer_id.hex()}" if peer_id is not None else text


def parse_host_port(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT``."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise AddressError(f"expected [IPV6]:PORT, got {text!r}")
        _check_ip(host, 6, text)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise AddressError(f"expected HOST:PORT, got {text!r}")
        if ":" in host:
            raise AddressError(f"an IPv6 address needs brackets, as in [::1]:9000; got {text!r}")
        _check_host(host, text)
    return host, _parse_port(port_text, text)


def parse_peer_address(text: str) -> PeerAddress:
    """Parse a bootstrap address in ``HOST:PORT`` or multiaddr form (see the module docstring)."""
    text = text.strip()
    if not text.startswith("/"):
        return PeerAddress(*parse_host_port(text))
    parts = text.split("/")[1:]
    if len(parts) not in (4, 6) or parts[0] not in _HOST_PROTOCOLS or parts[2] not in _PORT_PROTOCOLS:
        raise AddressError(f"expected /ip4|ip6|dns/HOST/udp|tcp/PORT[/p2p/PEERID], got {text!r}")
    proto, host, _, port_text = parts[:4]
    if proto == "ip4":
        _check_ip(host, 4, text)
    elif proto == "ip6":
        _check_ip(host, 6, text)
    elif not _HOSTNAME.match(host):
        raise AddressError(f"{host!r} is not a valid host name in {text!r}")
    peer_id = None
    if len(parts) == 6:
        if parts[4] != "p2p":
            raise AddressError(f"expected /p2p/PEERID after the port, got {text!r}")
        try:
            peer_id = parse_peer_id(parts[5])
        except IdentityError as exc:
            raise AddressError(f"bad peer id in {text!r}: {exc}") from exc
    return PeerAddress(host, _parse_port(port_text, text), peer_id)


def _parse_port(port_text: str, whole: str) -> int:
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AddressError(f"port must be 1-65535 in {whole!r}")
    return int(port_text)


def _check_ip(host: str, version: int, whole: str) -> None:
    try:
        if ipaddress.ip_address(host).version == version:
            return
    except ValueError:
        pass
    raise AddressError(f"{host!r} is not an IPv{version} address in {whole!r}")


def _check_host(host: str, whole: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise AddressError(f"{host!r} is not a valid host in {whole!r}") from None
