"""DHT benchmark: resolve time of all blocks of a model, and the cost of one announce.

Starts real swarms on loopback (the ``bootstrap`` command plus DHT nodes in several processes, via
tests/p2p/swarm_proc.py), at each swarm size given, with 10 workers announcing a 30-block model.
For comparison it also starts a swarm of stock kademlia 2.2.3 nodes of the same size (30 keys,
one value each) and times a client's concurrent ``get`` of the 30 keys.

    python bench/bench_dht.py --nodes 20 50 --rounds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests" / "p2p")]

from p2p_harness import Proc, start_bootstrap, start_swarm_proc  # noqa: E402

from inferencemesh.p2p.announcer import Announcer  # noqa: E402
from inferencemesh.p2p.lookup import find_block_providers  # noqa: E402
from inferencemesh.p2p.node import DHTConfig, DHTNode  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BLOCKS = 30
WORKERS = 10
PROCS = 3  # processes hosting the storing nodes (workers get one more)


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"median {1000 * statistics.median(ordered):6.2f} ms, p90 {1000 * p90:6.2f} ms"


async def _measure_ours(bootstrap: str, rounds: int) -> dict:
    config = DHTConfig(rpc_timeout=0.5)
    client = await DHTNode.start(bootstrap=[bootstrap], client_mode=True, config=config)
    started = time.perf_counter()
    cold = await find_block_providers(client, MODEL, BLOCKS)
    cold_s = time.perf_counter() - started
    assert all(cold[b] for b in range(BLOCKS)), "some block has no provider"
    warm = []
    for _ in range(rounds):
        started = time.perf_counter()
        await find_block_providers(client, MODEL, BLOCKS)
        warm.append(time.perf_counter() - started)
    sent_before = client.protocol.requests_sent
    await find_block_providers(client, MODEL, BLOCKS)
    rpcs_per_resolve = client.protocol.requests_sent - sent_before
    await client.close()

    worker = await DHTNode.start(bootstrap=[bootstrap], config=config)
    announcer = Announcer(
        worker,
        worker.identity,
        model_id=MODEL,
        total_blocks=BLOCKS,
        span_start=0,
        span_end=BLOCKS,
        addresses=["127.0.0.1:1"],
        dtype="float32",
        ttl=60,
    )
    announces = []
    for _ in range(5):
        sent_before = worker.protocol.requests_sent
        report = await announcer.publish()
        rpcs = worker.protocol.requests_sent - sent_before
        announces.append((report.seconds, rpcs, min(report.accepted.values())))
    await announcer.stop()
    await worker.close()
    return {"cold_s": cold_s, "warm": warm, "rpcs_per_resolve": rpcs_per_resolve, "announces": announces}


def run_ours(nodes: int, rounds: int) -> dict:
    boot, bootstrap = start_bootstrap()
    procs: list[Proc] = [boot]
    try:
        storing = nodes - 1 - WORKERS
        per_proc = [storing // PROCS + (1 if i < storing % PROCS else 0) for i in range(PROCS)]
        base = {"bootstrap": bootstrap, "rpc_timeout": 0.5, "ttl": 60.0}
        for count in per_proc:
            procs.append(start_swarm_proc({**base, "nodes": count, "workers": []}))
        for proc in procs[1:]:
            proc.read_json(60)
        spans = [(0, 20) if i % 2 == 0 else (10, 30) for i in range(WORKERS)]
        workers = [{"model": MODEL, "total": BLOCKS, "start": s, "end": e} for s, e in spans]
        procs.append(start_swarm_proc({**base, "nodes": 0, "workers": workers, "start_at": time.time()}))
        procs[-1].read_json(60)
        return asyncio.run(_measure_ours(bootstrap, rounds))
    finally:
        for proc in procs[1:]:
            proc.close()
        boot.terminate()


# A process of stock kademlia 2.2.3 nodes: joins, lets each node set some of the 30 keys, waits.
_STOCK_CHILD = textwrap.dedent("""
    import asyncio, json, sys
    from kademlia.network import Server
    from kademlia.storage import ForgetfulStorage
    async def main(boot_port, count, keys):
        servers = []
        for _ in range(count):
            server = Server()
            await server.listen(0, "127.0.0.1")
            await server.bootstrap([("127.0.0.1", boot_port)])
            servers.append(server)
        for i, key in enumerate(keys):
            await servers[i % count].set(key, "provider-" + key)
        print(json.dumps({"ready": count}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])))
""")


async def _stock_swarm_lookup(nodes: int, rounds: int) -> dict:
    from kademlia.network import Server
    from kademlia.storage import ForgetfulStorage

    boot = Server()
    await boot.listen(0, "127.0.0.1")
    boot_port = boot.transport.get_extra_info("sockname")[1]
    keys = [f"{MODEL}/{b}" for b in range(BLOCKS)]
    per_proc = [(nodes - 1) // PROCS + (1 if i < (nodes - 1) % PROCS else 0) for i in range(PROCS)]
    chunks = [keys[i::PROCS] for i in range(PROCS)]
    procs = [
        Proc(["-c", _STOCK_CHILD, str(boot_port), str(n), json.dumps(c)], "stock kademlia nodes")
        for n, c in zip(per_proc, chunks, strict=True)
    ]
    try:
        for proc in procs:
            await asyncio.get_running_loop().run_in_executor(None, proc.read_json, 120)
        # A client that keeps nothing: stock nodes hand their values to any new node, so a normal
        # stock client would answer later gets from its own storage without asking the network.
        client = Server(storage=ForgetfulStorage(ttl=0))
        await client.listen(0, "127.0.0.1")
        await client.bootstrap([("127.0.0.1", boot_port)])
        samples, found = [], 0
        for _ in range(rounds):
            started = time.perf_counter()
            values = await asyncio.gather(*(client.get(k) for k in keys))
            samples.append(time.perf_counter() - started)
            found = sum(v is not None for v in values)
        client.stop()
        return {"warm": samples, "found": found}
    finally:
        boot.stop()
        for proc in procs:
            proc.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    for nodes in args.nodes:
        print(
            f"== {nodes} DHT nodes ({WORKERS} workers, {BLOCKS}-block model), {args.rounds} rounds",
            flush=True,
        )
        ours = run_ours(nodes, args.rounds)
        print(
            f"inferencemesh resolve of {BLOCKS} blocks: cold {1000 * ours['cold_s']:.2f} ms; "
            f"warm {_ms(ours['warm'])}; {ours['rpcs_per_resolve']} RPCs per resolve"
        )
        for seconds, rpcs, accepted in ours["announces"]:
            print(
                f"inferencemesh announce of a 30-block span (32 keys): {1000 * seconds:7.2f} ms, "
                f"{rpcs} RPCs, every key stored on >= {accepted} nodes"
            )
        stock = asyncio.run(_stock_swarm_lookup(nodes, args.rounds))
        print(
            f"stock kademlia get of {BLOCKS} keys: warm {_ms(stock['warm'])} "
            f"({stock['found']}/{BLOCKS} found)"
        )
        ratio = statistics.median(ours["warm"]) / statistics.median(stock["warm"])
        print(f"ratio inferencemesh/stock (median): {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
