"""Every worker setting with its default and meaning: the one place they are documented.

The CLI (`python -m inferencemesh worker`) builds its flags from these fields and also reads them from
a TOML file (`--config`) and from INFERENCEMESH_<NAME> environment variables; flags win over the
environment, which wins over the file, which wins over the defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def setting(default: object, help: str, **kwargs: object) -> object:
    """A dataclass field whose help text the CLI and docs show."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class WorkerConfig:
    model_path: str = setting("", "HF model directory (config.json + safetensors); required")
    layers: str = setting("", "blocks to serve, 1-based inclusive, e.g. 1-10; required")
    bootstrap: list[str] = setting([], "DHT bootstrap node(s), HOST:PORT or /ip4/IP/udp/PORT[/p2p/ID]")
    host: str = setting("127.0.0.1", "address to bind (0.0.0.0 or :: for all interfaces)")
    port: int = setting(
        31330, "DHT UDP port; the QUIC data plane binds PORT+1 (space workers on one host 10 apart)"
    )
    announce_host: str = setting("", "address peers should dial (default: --host, or 127.0.0.1 for 0.0.0.0)")
    announce_port: int = setting(
        0, "QUIC port peers should dial, e.g. behind NAT or a proxy (default: PORT+1)"
    )
    device: str = setting("cpu", "torch device: cpu or cuda[:N]", choices=["cpu", "cuda"])
    dtype: str = setting("float32", "weight and cache dtype", choices=["float32", "bfloat16", "float16"])
    identity: str = setting("", "ed25519 identity file (created 0600 when missing); empty: a new identity")
    threads: int = setting(0, "torch compute threads; 0: torch's default (one per core)")
    cache_bytes: int = setting(256 << 20, "KV cache budget in bytes")
    max_session_length: int = setting(2048, "largest max_length a session may reserve (tokens)")
    max_batch: int = setting(32, "most decode steps batched into one forward")
    prefill_chunk: int = setting(256, "prefill tokens computed between two decode batches")
    batch_gather_ms: float = setting(
        0.5,
        "a decode batch waits for more steps from other active sessions while they keep arriving "
        "with gaps under this, up to one batch's compute time; 0: never wait",
    )
    inline_compute_ms: float = setting(
        50.0,
        "work expected to take at most this long runs on the event loop thread when the compute thread "
        "is idle (no thread hand-off); 0: always on the compute thread",
    )
    busy_poll_us: float = setting(
        1000.0,
        "while serving a single session, busy-poll the socket at least this long either side of when "
        "its next decode step is due, up to 10x as long when its steps come less regularly (a step "
        "landing on a running thread skips a wake-up); 0: never",
    )
    max_request_tokens: int = setting(8192, "most tokens one step or forward may carry")
    session_idle_timeout: float = setting(300.0, "seconds of inactivity after which a session is freed")
    announce_ttl: float = setting(60.0, "seconds a DHT entry lives; refreshed every third of it")
    drain_timeout: float = setting(
        5.0, "seconds, on SIGINT/SIGTERM, to finish in-flight steps and store the withdrawal where missed"
    )
    stats_interval: float = setting(30.0, "seconds between throughput / cache log lines")
    log_level: str = setting("info", "log level", choices=["debug", "info", "warning", "error"])
