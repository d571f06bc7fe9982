"""One process of a test swarm: several real DHT server nodes, some of them announcing workers.

Run as ``python swarm_proc.py CONFIG_JSON``. CONFIG_JSON keys:
  bootstrap      HOST:PORT or multiaddr of the node to join
  nodes          number of plain storing nodes
  workers        list of {"model", "total", "start", "end"}: one DHT node + Announcer each
  ttl            announce TTL in seconds
  start_at       unix time at which all workers announce at once (so several processes race)
  rpc_timeout    per-attempt RPC timeout
Prints one JSON line when ready (announced, and any repairs done): {"nodes": [{"peer_id",
"address"}], "workers": [{"peer_id", "min_accepted"}]}. Then reads JSON commands from stdin, one per line:
  {"cmd": "withdraw", "worker": I}  -> stops worker I cleanly, prints {"withdrawn": I, "min_accepted"}
End of stdin closes everything and exits; the tests kill the process to simulate a crash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

from inferencemesh.p2p.announcer import Announcer
from inferencemesh.p2p.node import DHTConfig, DHTNode


async def main(config: dict) -> None:
    # What each publish stored and what it left to repair, for the report of a failing test.
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("inferencemesh.p2p.announcer").setLevel(logging.DEBUG)
    dht_config = DHTConfig(rpc_timeout=config["rpc_timeout"])
    bootstrap = [config["bootstrap"]]
    nodes = list(await asyncio.gather(
        *(DHTNode.start(bootstrap=bootstrap, config=dht_config) for _ in range(config["nodes"]))
    ))
    announcers = []
    for i, spec in enumerate(config["workers"]):
        node = await DHTNode.start(bootstrap=bootstrap, config=dht_config)
        nodes.append(node)
        announcers.append(Announcer(
            node, node.identity, model_id=spec["model"], total_blocks=spec["total"],
            span_start=spec["start"], span_end=spec["end"], addresses=[f"127.0.0.1:{node.port + 1}"],
            dtype="float32", decode_tps=100.0 + i, prefill_tps=1000.0, free_cache_tokens=4096,
            ttl=config["ttl"],
        ))
    await asyncio.sleep(max(0.0, config.get("start_at", 0.0) - time.time()))
    reports = await asyncio.gather(*(a.start() for a in announcers))
    await asyncio.gather(*(a.settled() for a in announcers))  # keys the closest nodes missed, re-stored
    _say({
        "nodes": [{"peer_id": n.peer_id.hex(), "address": n.address} for n in nodes],
        "workers": [{"peer_id": a.identity.peer_id_hex, "min_accepted": min(r.accepted.values())}
                    for a, r in zip(announcers, reports, strict=True)],
    })
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        if command["cmd"] == "withdraw":
            report = await announcers[command["worker"]].stop()
            _say({"withdrawn": command["worker"], "min_accepted": min(report.accepted.values())})
    await asyncio.gather(*(announcer.stop() for announcer in announcers))
    for node in nodes:
        await node.close()


def _say(message: dict) -> None:
    print(json.dumps(message), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
