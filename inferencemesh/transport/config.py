"""Transport configuration and statistics records."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

MiB = 1 << 20


@dataclass(frozen=True)
class TransportConfig:
    """Limits and tuning of an endpoint. Defaults suit pipeline traffic: frames up to 256 MiB, 64 MiB
    prefill frames flowing without waiting for window updates, a dead peer detected within 1 s."""

    alpn: str = "inferencemesh/1"
    max_frame_size: int = 256 * MiB
    connection_window: int = 65 * MiB  # QUIC flow-control window per connection
    stream_window: int = 65 * MiB  # ... and per stream
    # Bytes of received frames whose handler has not finished, per connection; past it the sender is
    # stalled by flow control. Must be >= max_frame_size.
    max_pending_bytes: int = 256 * MiB
    max_streams: int = 1024  # concurrent streams a peer may open on a connection (each direction type)
    max_connections: int = 1024
    handshake_timeout_s: float = 5.0
    idle_timeout_s: float = 30.0
    # With operations outstanding, a peer silent for this long (despite keep-alive pings) is dead and
    # its pending requests fail with ConnectionLost / PeerUnreachable.
    dead_peer_timeout_s: float = 1.0
    request_timeout_s: float = 60.0  # default timeout of Endpoint.request
    pool_bytes: int = 2048 * MiB  # cap of the receive buffer pool
    socket_buffer_bytes: int = 8 * MiB
    max_udp_payload: int = 1452
    # To loopback addresses (this host): larger packets, so a token's hidden state goes in one packet,
    # not two (less to encrypt, decrypt and hand through QUIC per hop). 0: max_udp_payload there too.
    loopback_udp_payload: int = 16000
    gso: bool = True
    gro: bool = True
    # The event loop's thread reads the socket (one wake-up per message: lower latency for small
    # messages, and faster bulk transfers on the VM measured); False leaves it to the I/O thread
    # (docs/transport.md, "Who reads the socket").
    loop_reads_socket: bool = True

    _PYTHON_ONLY = ("request_timeout_s", "loop_reads_socket")

    def to_native(self, native_config_type: type) -> Any:
        """The native ``_core.quic.Config`` with these values (the _PYTHON_ONLY ones stay in Python)."""
        native = native_config_type()
        for f in fields(self):
            if f.name not in self._PYTHON_ONLY:
                setattr(native, f.name, getattr(self, f.name))
        return native


@dataclass(frozen=True)
class PeerStats:
    """Counters of the connection(s) with one peer. ``srtt_s`` is what the route planner reads."""

    connected: bool
    srtt_s: float
    min_rtt_s: float
    bytes_sent: int
    bytes_received: int
    messages_sent: int
    messages_received: int
    packets_lost: int  # QUIC packets with our stream data declared lost
    frames_dropped: int  # incoming frames refused (malformed, too large, out of memory)
    open_streams: int
    cwnd: int
    bytes_in_flight: int
    connections: int
    silent_s: float  # since the last packet of any kind from the peer (its I/O thread acks however busy)


@dataclass(frozen=True)
class EndpointStats:
    connections: int
    datagrams_received: int
    datagrams_sent: int
    sendmsg_calls: int
    socket_drops: int  # datagrams the kernel dropped because the receive buffer was full
    datagrams_discarded: int  # undecodable, or for no known connection
    handshakes_failed: int
    gso: bool
    gro: bool
