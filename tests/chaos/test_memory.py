"""Worker memory: a span costs memory in proportion to its blocks, the KV budget is a hard limit that
refuses sessions with CacheFull, and a long run of sessions does not make a worker grow.

RSS is read from /proc/<pid>/status of the real worker processes. A worker's RSS includes a fixed
runtime (Python, torch, the native transport; ~250-300 MB) that does not depend on its span, so the
span's cost is the RSS growth over that runtime: worker RSS minus the RSS of a process that imported
the worker's modules and ran a torch op but loaded no weights (docs/fault-tolerance.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from inferencemesh.client.route import BanList
from inferencemesh.client.session import SessionFailed
from inferencemesh.protocol.messages import CacheFull, MessageKind
from inferencemesh.testing.faulty_swarm import ChaosSwarm, wait_for_log
from tests.chaos.conftest import WorkerState, worker_states
from tests.swarm.conftest import PROMPTS

MAX_LENGTH = 64
BYTES_PER_TOKEN_30_BLOCKS = 2 * 30 * 3 * 64 * 4  # keys + values, 30 blocks, 3 KV heads of 64, fp32
SMALL_CACHE_SESSIONS = 3  # the small worker's budget holds exactly this many MAX_LENGTH sessions
MiB = 2**20

BASELINE = """
import torch, inferencemesh.server.worker, inferencemesh._core
torch.mm(torch.ones(64, 64), torch.ones(64, 64))
print(open("/proc/self/status").read())
"""


def status_bytes(status_text: str, field: str = "VmRSS") -> int:
    """A memory field of /proc/PID/status (VmRSS, RssAnon, RssFile, ...) in bytes."""
    line = next(line for line in status_text.splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def process_status(pid: int) -> str:
    with open(f"/proc/{pid}/status") as status:
        return status.read()


def process_rss(pid: int) -> int:
    return status_bytes(process_status(pid))


def describe_rss(label: str, status_text: str) -> str:
    parts = (
        f"{field} {status_bytes(status_text, field) / MiB:.0f}" for field in ("VmRSS", "RssAnon", "RssFile")
    )
    return f"{label}: {', '.join(parts)} MiB"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ChaosSwarm]:
    """A 10-block worker, and two 30-block workers: one whose KV budget holds 3 sessions, one roomy."""
    swarm = LocalSwarm(tmp_path_factory.mktemp("memory"))
    swarm.start_bootstrap()
    swarm.start_worker("1-10", smollm2_dir, name="ten")
    budget = SMALL_CACHE_SESSIONS * MAX_LENGTH * BYTES_PER_TOKEN_30_BLOCKS
    swarm.start_worker("1-30", smollm2_dir, "--cache-bytes", str(budget), name="small")
    swarm.start_worker("1-30", smollm2_dir, name="roomy")
    try:
        for name in ("ten", "small", "roomy"):
            wait_for_log(swarm, name, "serving on quic", timeout=180)
        swarm.wait_for_workers(3)
    except BaseException:
        swarm.stop()
        raise
    yield ChaosSwarm(swarm, smollm2_dir)
    swarm.stop()


@pytest.fixture(scope="module")
def client(swarm: ChaosSwarm, smollm2_dir: Path) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(smollm2_dir, [swarm.swarm.bootstrap]) as model:
        yield model


def test_a_10_block_worker_grows_at_most_45_percent_of_a_30_block_worker(swarm: ChaosSwarm) -> None:
    baseline = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True)
    statuses = {
        "runtime without weights": baseline.stdout,
        "10-block worker": process_status(swarm.swarm.processes["ten"][0].pid),
        "30-block worker": process_status(swarm.swarm.processes["roomy"][0].pid),
    }
    runtime, ten, thirty = (status_bytes(text) for text in statuses.values())
    print("; ".join(describe_rss(label, text) for label, text in statuses.items()))
    print(
        f"growth over the runtime: {(ten - runtime) / MiB:.0f} vs {(thirty - runtime) / MiB:.0f} MiB", end=""
    )
    print(f" = {(ten - runtime) / (thirty - runtime):.2f}")
    assert ten - runtime <= 0.45 * (thirty - runtime)


def open_raw_session(client: DistributedModelForCausalLM, swarm: ChaosSwarm, name: str) -> None:
    """OPEN_SESSION sent straight to one worker, as a client does on each hop of its route."""
    metadata = {
        "model_id": client.model_id,
        "session_id": os.urandom(16),
        "token": os.urandom(16),
        "max_length": MAX_LENGTH,
    }
    request = client.runtime.request(
        swarm.peer(name), swarm.address(name), MessageKind.OPEN_SESSION, metadata, 5.0
    )
    client.runtime.call(request)


def test_the_kv_budget_refuses_sessions_with_cache_full_and_the_client_goes_elsewhere_or_says_so(
    swarm: ChaosSwarm,
    client: DistributedModelForCausalLM,
    smollm2_dir: Path,
    reference_tokens: dict[str, list[int]],
) -> None:
    small = swarm.peer("small").hex()
    for _ in range(SMALL_CACHE_SESSIONS):
        open_raw_session(client, swarm, "small")
    with pytest.raises(CacheFull, match="KV cache full"):
        open_raw_session(client, swarm, "small")
    assert worker_states(swarm.swarm, client)[small] == WorkerState(SMALL_CACHE_SESSIONS, 0)

    # The full worker is avoided (or refuses, and is banned): the session runs on the roomy one.
    result = client.generate(PROMPTS[0], chat=True, max_new_tokens=MAX_LENGTH // 4)
    assert result.token_ids == reference_tokens[PROMPTS[0]]
    assert [hop["peer_id"] for hop in result.route] == [swarm.peer("roomy").hex()]

    # With the roomy worker out of the picture, the client says why nobody took the session.
    with DistributedModelForCausalLM.from_pretrained(smollm2_dir, [swarm.swarm.bootstrap]) as newcomer:
        newcomer.bans.ban(swarm.peer("roomy"), "test: only the full worker is left")
        with pytest.raises(SessionFailed, match="KV cache full"):
            newcomer.generate(PROMPTS[0], chat=True, max_new_tokens=MAX_LENGTH // 4)
    assert worker_states(swarm.swarm, client)[small] == WorkerState(SMALL_CACHE_SESSIONS, 0)


@pytest.mark.slow
def test_rss_stays_flat_over_1000_sequential_sessions(swarm: ChaosSwarm, smollm2_dir: Path) -> None:
    """Each session opens, prefills, decodes one token and closes. After a warm-up of 100 sessions (the
    allocator and caches reach their working size), 900 more may not grow the worker by more than
    16 MiB: leaking each session's KV cache (~0.35 MiB here) would add ~320 MiB.
    One client opens them all: its connection to the worker carries ~2000 one-way STEP messages, past
    the 1024 streams a QUIC peer grants at once (which once stalled a connection: csrc/quic)."""
    roomy = swarm.peer("roomy")
    pid = swarm.swarm.processes["roomy"][0].pid
    samples = {}
    with DistributedModelForCausalLM.from_pretrained(smollm2_dir, [swarm.swarm.bootstrap]) as client:
        client.bans = BanList(base_s=3600.0)
        client.bans.ban(swarm.peer("small"), "test: measure the roomy worker")
        prompt = client.encode_prompt(PROMPTS[1])
        for count in range(1, 1001):
            result = client.generate(prompt, max_new_tokens=2, ignore_eos=True)
            assert result.route[0]["peer_id"] == roomy.hex() and result.failovers == 0
            if count in (100, 1000):
                samples[count] = process_rss(pid)
        idle = worker_states(swarm.swarm, client)[roomy.hex()]
    assert idle.sessions == 0
    print(
        f"roomy worker RSS after 100 sessions {samples[100] / MiB:.1f} MiB, "
        f"after 1000: {samples[1000] / MiB:.1f} MiB"
    )
    assert samples[1000] - samples[100] <= 16 * MiB
