"""`python -m inferencemesh demo`: a whole swarm on this machine answering one prompt.

Prepares SmolLM2-135M-Instruct if needed, starts a bootstrap node and three workers (blocks 1-10, 11-20,
21-30) as subprocesses on loopback, streams the answer to a chat prompt, prints timings, and shuts every
process down, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inferencemesh.cli.logs import setup_logging

DEFAULT_PROMPT = "What is the capital of France?"
WORKER_LAYERS = ("1-10", "11-20", "21-30")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a local swarm (bootstrap + 3 workers) on SmolLM2 and answer a prompt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"chat prompt (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="default: 48")
    parser.add_argument(
        "--model-path", metavar="DIR", help="use this HF model directory instead of preparing SmolLM2"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="first UDP port; the nodes use PORT, PORT+10, PORT+20, PORT+30 (+1 each for "
        "QUIC). Default: a free range",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="how long to wait for the swarm to cover every block (default: 180)",
    )
    parser.set_defaults(func=run)


def ports_free(base: int, count: int) -> bool:
    for port in range(base, base + count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def pick_base_port() -> int:
    for _ in range(100):
        base = random.randrange(20000, 60000, 10)
        if all(ports_free(base + 10 * i, 2) for i in range(len(WORKER_LAYERS) + 1)):
            return base
    raise RuntimeError("found no free UDP port range on 127.0.0.1; pass --port")


class Swarm:
    """The demo's subprocesses; their output goes to log files shown when something fails."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def spawn(self, name: str, *args: str) -> None:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "inferencemesh", *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the demo only; it stops the children itself
            )
        self.processes.append((name, process, log_path))

    def check_alive(self) -> None:
        for name, process, log_path in self.processes:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(f"{name} exited with code {process.returncode}:\n  " + "\n  ".join(tail))

    def stop(self, timeout: float = 10.0) -> None:
        for _, process, _ in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, process, _ in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in {timeout:.0f} s: killing it", flush=True)
                process.kill()
                process.wait()


def wait_for_coverage(swarm: Swarm, bootstrap: str, timeout: float) -> None:
    from inferencemesh.cli.status import collect

    deadline = time.monotonic() + timeout
    while True:
        swarm.check_alive()
        report = asyncio.run(collect([bootstrap], "127.0.0.1"))
        if report["complete"]:
            workers = sum(len(m["workers"]) for m in report["models"])
            print(f"swarm ready: {workers} workers cover every block", flush=True)
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the swarm did not cover every block within {timeout:.0f} s")
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    setup_logging("warning")
    from inferencemesh.compute.prepare import prepare_model

    started = time.perf_counter()
    model_path = Path(args.model_path) if args.model_path else prepare_model("smollm2")
    base = args.port or pick_base_port()
    bootstrap = f"127.0.0.1:{base}"
    with tempfile.TemporaryDirectory(prefix="inferencemesh-demo-") as log_dir:
        swarm = Swarm(Path(log_dir))
        # SIGTERM to the demo unwinds like Ctrl-C, so the children are stopped either way.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            print(f"starting bootstrap node on udp {bootstrap}", flush=True)
            swarm.spawn("bootstrap", "bootstrap", "--host", "127.0.0.1", "--port", str(base))
            for index, layers in enumerate(WORKER_LAYERS, start=1):
                port = base + 10 * index
                print(
                    f"starting worker for layers {layers} on udp {port} (dht) / {port + 1} (quic)", flush=True
                )
                swarm.spawn(
                    f"worker-{layers}",
                    "worker",
                    "--bootstrap",
                    bootstrap,
                    "--layers",
                    layers,
                    "--model-path",
                    str(model_path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--stats-interval",
                    "3600",
                )
            wait_for_coverage(swarm, bootstrap, args.start_timeout)
            print(f"swarm up in {time.perf_counter() - started:.1f} s", flush=True)
            return answer(model_path, bootstrap, args.prompt, args.max_new_tokens)
        except KeyboardInterrupt:
            print("\ninterrupted", flush=True)
            return 130
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            print("stopping the swarm", flush=True)
            swarm.stop()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def answer(model_path: Path, bootstrap: str, prompt: str, max_new_tokens: int) -> int:
    from inferencemesh.client.model import DistributedModelForCausalLM

    with DistributedModelForCausalLM.from_pretrained(model_path, [bootstrap]) as model:
        print(f"\n> {prompt}\n", flush=True)
        result = model.generate(
            prompt,
            chat=True,
            max_new_tokens=max_new_tokens,
            on_text=lambda text: print(text, end="", flush=True),
        )
    print("\n", flush=True)
    route = " -> ".join(f"{hop['peer_id'][:12]} [{hop['layers']}]" for hop in result.route)
    print(f"route: client -> {route} -> client")
    print(
        f"{len(result.token_ids)} tokens; first token after {result.ttft_s * 1000:.0f} ms; "
        f"decode {result.decode_tokens_per_s:.1f} tok/s; failovers {result.failovers}",
        flush=True,
    )
    return 0
