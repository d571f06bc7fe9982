"""Generation survives workers that die, hang or vanish from the network, with unchanged output.

The swarm has two workers per span. Each seeded run strikes a hop of the session's route at a point
of the prefill or of a decode step drawn from its seed; the run must produce the tokens of an
uninterrupted run, logits within 1e-4, and must have failed over. Killed workers are replaced before
the next test. The tests run in file order and the last one kills the bootstrap node.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferencemesh.client.model import DistributedModelForCausalLM
from inferencemesh.client.route import BanList
from inferencemesh.client.session import SessionFailed, SessionOptions
from inferencemesh.testing.chaos import FaultPlan, FaultyRun, greedy_with_fault, max_logit_difference
from inferencemesh.testing.faulty_swarm import ChaosSwarm, wait_for_log
from inferencemesh.testing.udp_proxy import Faults, UdpProxy
from tests.chaos.conftest import RecoveryLog
from tests.swarm.conftest import MAX_NEW_TOKENS, PROMPTS, start_swarm

PROMPT = PROMPTS[2]  # its greedy answer runs the full MAX_NEW_TOKENS: faults can land on any step
SPANS = ("1-10", "11-20", "21-30")
LOGIT_TOLERANCE = 1e-4
BRIEF_BAN_S = 1.0  # bans a test sets to force a route, short enough to be over before the fault
DEFAULT_SEEDS = [0, 1, 2]  # decode step 14 / prefill / decode step 2, on hops 2 / 0 / 1
SLOW_SEEDS = list(range(3, 12))


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[ChaosSwarm]:
    swarm = start_swarm(tmp_path_factory.mktemp("chaos"), smollm2_dir, tuple(s for s in SPANS for _ in "ab"))
    chaos = ChaosSwarm(swarm, smollm2_dir)
    yield chaos
    chaos.thaw_all()
    swarm.stop()


@pytest.fixture(scope="module")
def client(chaos: ChaosSwarm, smollm2_dir: Path) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(smollm2_dir, [chaos.swarm.bootstrap]) as model:
        yield model


@pytest.fixture(scope="module")
def prompt_ids(client: DistributedModelForCausalLM) -> list[int]:
    return client.encode_prompt(PROMPT, chat=True)


@pytest.fixture(scope="module")
def uninterrupted(
    client: DistributedModelForCausalLM, prompt_ids: list[int], reference_tokens: dict[str, list[int]]
) -> FaultyRun:
    run = greedy_with_fault(client, prompt_ids, MAX_NEW_TOKENS)
    assert run.tokens == reference_tokens[PROMPT]
    assert run.failovers == 0 and len(run.tokens) == MAX_NEW_TOKENS
    return run


def assert_unchanged(run: FaultyRun, uninterrupted: FaultyRun) -> None:
    assert run.tokens == uninterrupted.tokens
    assert max_logit_difference(run.logits, uninterrupted.logits) <= LOGIT_TOLERANCE


SEEDS = [*DEFAULT_SEEDS, *(pytest.param(seed, marks=pytest.mark.slow) for seed in SLOW_SEEDS)]


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_of_a_replicated_worker_changes_nothing(
    seed: int,
    chaos: ChaosSwarm,
    client: DistributedModelForCausalLM,
    prompt_ids: list[int],
    uninterrupted: FaultyRun,
    recoveries: RecoveryLog,
) -> None:
    plan = FaultPlan.draw(seed, steps=len(uninterrupted.tokens) - 1, hops=len(SPANS))
    run = greedy_with_fault(client, prompt_ids, MAX_NEW_TOKENS, plan, chaos.kill)
    chaos.replace_dead()
    assert_unchanged(run, uninterrupted)
    assert run.failovers >= 1
    recoveries.add(f"SIGKILL, {plan.describe()}", run)


def test_a_frozen_worker_is_failed_over_and_its_late_work_changes_nothing(
    chaos: ChaosSwarm,
    client: DistributedModelForCausalLM,
    prompt_ids: list[int],
    uninterrupted: FaultyRun,
    recoveries: RecoveryLog,
) -> None:
    """SIGSTOP the first hop mid-decode; three steps after the session failed over, SIGCONT it: it then
    finishes the step it held, now stale, and passes it on down the chain, where it must change nothing."""
    steps_since_failover = []

    def thaw_later(run: FaultyRun) -> None:
        if run.failovers:
            steps_since_failover.append(len(run.logits))
        if len(steps_since_failover) == 3:
            chaos.thaw_all()
            time.sleep(0.3)  # let the thawed worker deliver its stale work before the next step

    plan = FaultPlan(seed=-1, step=5, delay_s=0.0, hop=0)
    run = greedy_with_fault(client, prompt_ids, MAX_NEW_TOKENS, plan, chaos.freeze, thaw_later)
    assert_unchanged(run, uninterrupted)
    assert run.failovers == 1
    recoveries.add("SIGSTOP of hop 0 in decode step 5", run)


def test_failovers_are_bounded_by_max_failovers(
    chaos: ChaosSwarm, smollm2_dir: Path, prompt_ids: list[int]
) -> None:
    options = SessionOptions(max_failovers=0)
    with DistributedModelForCausalLM.from_pretrained(
        smollm2_dir, [chaos.swarm.bootstrap], options=options
    ) as model:
        plan = FaultPlan(seed=-1, step=3, delay_s=0.0, hop=1)
        try:
            with pytest.raises(SessionFailed, match="gave up after 0 failovers"):
                greedy_with_fault(model, prompt_ids, MAX_NEW_TOKENS, plan, chaos.freeze)
        finally:
            chaos.thaw_all()


def test_losing_every_worker_of_a_span_names_the_missing_layers(
    chaos: ChaosSwarm, client: DistributedModelForCausalLM, prompt_ids: list[int]
) -> None:
    def kill_the_span(_: bytes) -> None:
        for name in chaos.workers("21-30"):
            chaos.kill_name(name)

    plan = FaultPlan(seed=-1, step=4, delay_s=0.0, hop=2)
    started = time.monotonic()
    try:
        with pytest.raises(SessionFailed, match="no live worker serves layers 21-30"):
            greedy_with_fault(client, prompt_ids, MAX_NEW_TOKENS, plan, kill_the_span)
        assert time.monotonic() - started < 60  # a bounded search, not an endless retry loop
    finally:
        chaos.replace_dead()


def test_client_json_counts_the_failover_and_the_log_explains_it(
    chaos: ChaosSwarm, smollm2_dir: Path, reference_tokens: dict[str, list[int]]
) -> None:
    """The `client` command, with the middle worker of its route killed while it decodes."""
    middle = chaos.workers("11-20")
    seen = {name: chaos.swarm.log(name).count("opened") for name in middle}
    command = [
        sys.executable, "-m", "inferencemesh", "client", "--bootstrap", chaos.swarm.bootstrap,
        "--model-path", str(smollm2_dir), "--prompt", PROMPTS[0], "--chat", "--ignore-eos",
        "--max-new-tokens", "60", "--json",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (used := [n for n in middle if chaos.swarm.log(n).count("opened") > seen[n]]):
            assert process.poll() is None and time.monotonic() < deadline, "the client never opened a session"
            time.sleep(0.02)
        time.sleep(0.5)  # into the decode
        chaos.kill_name(used[0])
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        chaos.replace_dead()
    assert process.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["failovers"] == 1
    expected = reference_tokens[PROMPTS[0]]
    assert report["token_ids"][: len(expected)] == expected
    assert "failover 1:" in stderr and "detected after" in stderr and "recovered in" in stderr


# ---------------------------------------------------------------------------------- the network
@pytest.fixture(scope="module")
def proxied(chaos: ChaosSwarm) -> Iterator[tuple[UdpProxy, bytes]]:
    """One more 11-20 worker, announced at a UDP proxy in front of its QUIC port."""
    proxy = UdpProxy(("127.0.0.1", 0), seed=7)  # the upstream is set once the worker's port is known
    name = chaos.swarm.start_worker("11-20", chaos.model_dir, "--announce-port", str(proxy.port))
    proxy.upstream = ("127.0.0.1", int(name.rsplit("-", 1)[1]) + 1)
    with proxy:
        wait_for_log(chaos.swarm, name, "serving on quic")
        peer = chaos.peer_of(name)
        assert peer is not None
        chaos.swarm.wait_until(
            lambda r: any(w["peer_id"] == peer.hex() for m in r["models"] for w in m["workers"]),
            60,
            "the proxied worker to be announced",
        )
        yield proxy, peer


@pytest.fixture
def through_proxy(
    chaos: ChaosSwarm, proxied: tuple[UdpProxy, bytes], smollm2_dir: Path
) -> Iterator[DistributedModelForCausalLM]:
    """A client that routes layers 11-20 through the proxied worker (it bans the other 11-20 workers)."""
    _, peer = proxied
    with DistributedModelForCausalLM.from_pretrained(smollm2_dir, [chaos.swarm.bootstrap]) as model:
        model.bans = BanList(base_s=BRIEF_BAN_S)
        for other in {chaos.peer_of(name) for name in chaos.workers("11-20")} - {peer, None}:
            model.bans.ban(other, "test: route through the proxy")
        yield model


def wait_for_bans_to_expire(model: DistributedModelForCausalLM) -> None:
    """The bans that forced the route are over: a failover may go to any other worker."""
    while model.bans.banned():
        time.sleep(0.05)


def test_delay_reordering_and_loss_change_nothing(
    proxied: tuple[UdpProxy, bytes],
    through_proxy: DistributedModelForCausalLM,
    prompt_ids: list[int],
    uninterrupted: FaultyRun,
) -> None:
    proxy, _ = proxied
    proxy.faults = Faults(delay_s=0.002, jitter_s=0.004, loss=0.03, reorder=0.1, reorder_s=0.005)
    try:
        run = greedy_with_fault(through_proxy, prompt_ids, MAX_NEW_TOKENS)
    finally:
        proxy.faults = Faults()
    assert_unchanged(run, uninterrupted)
    assert proxy.stats.dropped > 0 and proxy.stats.reordered > 0  # the faults did happen
    print(f"proxy: {proxy.stats}; {run.failovers} failovers")


def test_a_worker_cut_off_from_the_network_is_failed_over(
    proxied: tuple[UdpProxy, bytes],
    through_proxy: DistributedModelForCausalLM,
    prompt_ids: list[int],
    uninterrupted: FaultyRun,
    recoveries: RecoveryLog,
) -> None:
    proxy, peer = proxied

    def cut_off(victim: bytes) -> None:
        assert victim == peer
        proxy.faults = Faults(loss=1.0)

    plan = FaultPlan(seed=-1, step=6, delay_s=0.0, hop=1)
    try:
        run = greedy_with_fault(
            through_proxy,
            prompt_ids,
            MAX_NEW_TOKENS,
            plan,
            cut_off,
            after_step=lambda run: wait_for_bans_to_expire(through_proxy) if len(run.logits) == 1 else None,
        )
    finally:
        proxy.faults = Faults()
    assert_unchanged(run, uninterrupted)
    assert run.failovers == 1
    recoveries.add("network cut (100% loss) of hop 1 in decode step 6", run)


def test_a_lost_span_is_rebuilt_over_two_smaller_workers(
    chaos: ChaosSwarm,
    client: DistributedModelForCausalLM,
    prompt_ids: list[int],
    uninterrupted: FaultyRun,
    recoveries: RecoveryLog,
) -> None:
    """Every 11-20 worker dies mid-decode; only 11-15 and 16-20 workers are left to replace it."""
    halves = [chaos.swarm.start_worker(layers, chaos.model_dir) for layers in ("11-15", "16-20")]
    chaos.swarm.wait_until(
        lambda r: (
            {(chaos.peer_of(n) or b"").hex() for n in halves}
            <= {w["peer_id"] for m in r["models"] for w in m["workers"]}
        ),
        60,
        "the 11-15 and 16-20 workers to be announced",
    )

    def kill_every_11_20_worker(_: bytes) -> None:
        for name in chaos.workers("11-20"):
            chaos.kill_name(name)

    plan = FaultPlan(seed=-1, step=10, delay_s=0.01, hop=1)
    try:
        run = greedy_with_fault(client, prompt_ids, MAX_NEW_TOKENS, plan, kill_every_11_20_worker)
    finally:
        chaos.replace_dead()
    assert_unchanged(run, uninterrupted)
    assert run.failovers == 1
    assert [hop["layers"] for hop in run.route] == ["1-10", "11-15", "16-20", "21-30"]
    recoveries.add("SIGKILL of every 11-20 worker in decode step 10 (replaced by 11-15 + 16-20)", run)


# ------------------------------------------------------------------------- last: the DHT loses a node
def test_killing_the_bootstrap_dht_node_with_a_worker_changes_nothing(
    chaos: ChaosSwarm,
    client: DistributedModelForCausalLM,
    prompt_ids: list[int],
    uninterrupted: FaultyRun,
    recoveries: RecoveryLog,
    smollm2_dir: Path,
) -> None:
    """The bootstrap node dies together with a worker (and that worker's DHT node): re-planning must find
    the replacement through the remaining DHT nodes; then a new client joins through a worker's DHT port."""

    def kill_bootstrap_and_worker(victim: bytes) -> None:
        chaos.swarm.stop_process("bootstrap", signal.SIGKILL)
        chaos.kill(victim)

    plan = FaultPlan(seed=-1, step=8, delay_s=0.01, hop=1)
    run = greedy_with_fault(client, prompt_ids, MAX_NEW_TOKENS, plan, kill_bootstrap_and_worker)
    del chaos.swarm.processes["bootstrap"]
    assert_unchanged(run, uninterrupted)
    assert run.failovers >= 1
    recoveries.add("SIGKILL of the bootstrap DHT node and hop 1 in decode step 8", run)

    survivor = chaos.workers("1-10")[0]
    dht_port = int(survivor.rsplit("-", 1)[1])
    with DistributedModelForCausalLM.from_pretrained(smollm2_dir, [f"127.0.0.1:{dht_port}"]) as newcomer:
        assert greedy_with_fault(newcomer, prompt_ids, MAX_NEW_TOKENS).tokens == uninterrupted.tokens
