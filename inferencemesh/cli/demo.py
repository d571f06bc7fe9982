"""`python -m inferencemesh demo`: a whole swarm on this machine answering one prompt.

Prepares SmolLM2-135M-Instruct if needed, starts a bootstrap node and three workers (blocks 1-10, 11-20,
21-30) as subprocesses on loopback, streams the answer to a chat prompt, prints timings, and shuts every
process down, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import logging
import signal
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


def run(args: argparse.Namespace) -> int:
    setup_logging("warning")
    logging.getLogger("inferencemesh.p2p").setLevel(logging.ERROR)  # "bootstrap not up yet" while starting
    from inferencemesh.cli.local_swarm import LocalSwarm
    from inferencemesh.compute.prepare import prepare_model

    started = time.perf_counter()
    model_path = Path(args.model_path) if args.model_path else prepare_model("smollm2")
    with tempfile.TemporaryDirectory(prefix="inferencemesh-demo-") as log_dir:
        swarm = LocalSwarm(Path(log_dir), base_port=args.port, max_nodes=len(WORKER_LAYERS) + 1)
        # SIGTERM to the demo unwinds like Ctrl-C, so the children are stopped either way.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            print(f"starting bootstrap node on udp {swarm.bootstrap}", flush=True)
            swarm.start_bootstrap()
            for layers in WORKER_LAYERS:
                name = swarm.start_worker(layers, model_path, "--stats-interval", "3600")
                print(f"starting {name} (udp: dht on the port shown, quic on the next)", flush=True)
            report = swarm.wait_for_workers(len(WORKER_LAYERS), timeout=args.start_timeout)
            print(
                f"swarm ready in {time.perf_counter() - started:.1f} s: "
                f"{report['models'][0]['model_id']} fully covered",
                flush=True,
            )
            return answer(model_path, swarm.bootstrap, args.prompt, args.max_new_tokens)
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
