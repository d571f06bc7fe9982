"""`python -m inferencemesh status`: what the swarm serves, who serves it, and whether it is complete."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from inferencemesh.cli.logs import setup_logging


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show the models, live workers and block coverage of a swarm",
        description="Join the DHT as a client, list every model announced, its live workers "
        "(peer id, layers, addresses, throughput, free cache) and whether every block is covered.",
    )
    parser.add_argument(
        "--bootstrap",
        action="append",
        required=True,
        metavar="ADDR",
        help="DHT bootstrap node, HOST:PORT or /ip4/IP/udp/PORT[/p2p/ID] (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--host", default="127.0.0.1", help="local address to bind (default: 127.0.0.1)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


async def collect(bootstrap: list[str], host: str) -> dict[str, Any]:
    from inferencemesh.compute.span import format_block_range
    from inferencemesh.p2p.lookup import swarm_status
    from inferencemesh.p2p.node import DHTNode

    node = await DHTNode.start(host=host, port=0, bootstrap=bootstrap, client_mode=True)
    try:
        status = await swarm_status(node)
    finally:
        await node.close()
    models = []
    for model_id, model in sorted(status.models.items()):
        workers = [
            {
                "peer_id": entry.peer_id.hex(),
                "layers": format_block_range(entry.span_start, entry.span_end),
                "addresses": list(entry.addresses),
                "dtype": entry.dtype,
                "decode_tokens_per_s": entry.decode_tps,
                "prefill_tokens_per_s": entry.prefill_tps,
                "free_cache_tokens": entry.free_cache_tokens,
                "load": entry.load,
            }
            for entry in sorted(model.workers, key=lambda e: (e.span_start, e.peer_id))
        ]
        missing = model.missing_blocks
        models.append(
            {
                "model_id": model_id,
                "total_blocks": model.total_blocks,
                "complete": not missing,
                "missing_layers": [b + 1 for b in missing],
                "workers": workers,
            }
        )
    return {"models": models, "complete": bool(models) and all(m["complete"] for m in models)}


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        report = asyncio.run(collect(args.bootstrap, args.host))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}")
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report["models"]:
        print("no models announced in this swarm (are workers running and joined to this bootstrap node?)")
        return 0
    for model in report["models"]:
        state = "complete" if model["complete"] else f"MISSING layers {model['missing_layers']}"
        print(f"model {model['model_id']}: {model['total_blocks']} blocks, {state}")
        for w in model["workers"]:
            print(
                f"  {w['peer_id'][:12]}  layers {w['layers']:>7}  {','.join(w['addresses']):<22} "
                f"{w['dtype']:<8} {w['decode_tokens_per_s']:8.0f} tok/s/block  "
                f"free cache {w['free_cache_tokens']} tokens  load {w['load']:.2f}"
            )
    return 0
