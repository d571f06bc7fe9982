"""Bootstrap + 3 workers + clients as real processes on loopback with the real SmolLM2 model."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from inferencemesh.client.session import SessionOptions
from inferencemesh.p2p.address import parse_host_port
from inferencemesh.protocol.messages import MessageKind
from tests.swarm.conftest import MAX_NEW_TOKENS, PROMPTS


def test_greedy_generation_matches_transformers(
    client: DistributedModelForCausalLM, reference_tokens: dict[str, list[int]]
) -> None:
    for prompt in PROMPTS:
        result = client.generate(prompt, chat=True, max_new_tokens=MAX_NEW_TOKENS)
        assert result.token_ids == reference_tokens[prompt], prompt
        assert [hop["layers"] for hop in result.route] == ["1-10", "11-20", "21-30"]
        assert result.failovers == 0
    answer = client.generate(PROMPTS[0], chat=True, max_new_tokens=MAX_NEW_TOKENS)
    assert answer.text == "The capital of France is Paris."
    assert answer.finish_reason == "eos"


def test_inference_session_steps_match_one_shot_generation(
    client: DistributedModelForCausalLM, reference_tokens: dict[str, list[int]]
) -> None:
    prompt_ids = client.encode_prompt(PROMPTS[1], chat=True)
    tokens: list[int] = []
    with client.inference_session(max_length=len(prompt_ids) + 8) as session:
        logits = session.step(prompt_ids)
        for _ in range(8):
            tokens.append(int(logits.argmax()))
            logits = session.step([tokens[-1]])
        # Each decode step went out in the message encoded while the step before computed (a step
        # takes far longer than the 1 ms after which the wait encodes it).
        assert session.steps_encoded_ahead == 8
    assert tokens == reference_tokens[PROMPTS[1]][:8]


def test_eight_concurrent_clients_are_all_exact(
    swarm: LocalSwarm, smollm2_dir: Path, reference_tokens: dict[str, list[int]]
) -> None:
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def one_client(index: int) -> None:
        try:
            with DistributedModelForCausalLM.from_pretrained(smollm2_dir, [swarm.bootstrap]) as model:
                prompt = PROMPTS[index % len(PROMPTS)]
                results[index] = model.generate(prompt, chat=True, max_new_tokens=MAX_NEW_TOKENS).token_ids
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    for index in range(8):
        assert results[index] == reference_tokens[PROMPTS[index % len(PROMPTS)]]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferencemesh", *args], capture_output=True, text=True, timeout=timeout
    )


def run_client(swarm: LocalSwarm, smollm2_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`python -m inferencemesh client` with the chat prompt against ``swarm``."""
    common = ["--bootstrap", swarm.bootstrap, "--model-path", str(smollm2_dir), "--prompt", PROMPTS[0]]
    return run_cli("client", *common, "--chat", *extra)


def test_client_command_prints_the_json_report(
    swarm: LocalSwarm, smollm2_dir: Path, reference_tokens: dict[str, list[int]]
) -> None:
    done = run_client(swarm, smollm2_dir, "--max-new-tokens", str(MAX_NEW_TOKENS), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["token_ids"] == reference_tokens[PROMPTS[0]]
    assert report["text"] == "The capital of France is Paris."
    assert report["prompt_token_ids"][0] == 1  # <|im_start|> from the chat template
    assert report["ttft_s"] > 0 and report["decode_tokens_per_s"] > 0
    assert [hop["layers"] for hop in report["route"]] == ["1-10", "11-20", "21-30"]
    assert all(len(hop["peer_id"]) == 64 for hop in report["route"])
    assert report["failovers"] == 0


def test_client_command_streams_text(swarm: LocalSwarm, smollm2_dir: Path) -> None:
    done = run_client(swarm, smollm2_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "The capital of France is Paris."
    assert "tok/s" in done.stderr


def test_status_command_lists_workers_and_coverage(swarm: LocalSwarm) -> None:
    done = run_cli("status", "--bootstrap", swarm.bootstrap, "--json", timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["complete"] is True
    (model,) = report["models"]
    assert model["model_id"].startswith("smollm2-135m-")
    assert model["total_blocks"] == 30 and model["missing_layers"] == []
    assert sorted(w["layers"] for w in model["workers"]) == ["1-10", "11-20", "21-30"]
    for worker in model["workers"]:
        assert worker["free_cache_tokens"] > 0 and worker["decode_tokens_per_s"] > 0
        assert worker["addresses"][0].startswith("127.0.0.1:")


def test_client_without_a_swarm_says_which_blocks_are_missing(smollm2_dir: Path, tmp_path: Path) -> None:
    lonely = LocalSwarm(tmp_path)
    lonely.start_bootstrap()
    lonely.start_worker("1-10", smollm2_dir)
    try:
        lonely.wait_until(lambda r: bool(r["models"]), 120, "one worker announced")
        done = run_cli(
            "client", "--bootstrap", lonely.bootstrap, "--model-path", str(smollm2_dir), "--prompt", "hi"
        )
    finally:
        lonely.stop()
    assert done.returncode == 1
    assert "no live worker serves layers 11-30" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_worker_and_client_on_a_missing_gpu_say_to_use_the_cpu(smollm2_dir: Path) -> None:
    common = ["--bootstrap", "127.0.0.1:9", "--model-path", str(smollm2_dir), "--device", "cuda"]
    worker = run_cli("worker", *common, "--layers", "1-10", "--port", "47390", timeout=60)
    client = run_cli("client", *common, "--prompt", "hi", timeout=60)
    for done in (worker, client):
        assert done.returncode == 1
        assert "sees no CUDA GPU; use --device cpu" in done.stderr


def test_demo_answers_and_shuts_every_process_down(smollm2_dir: Path) -> None:
    done = run_cli("demo", "--max-new-tokens", "16", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "The capital of France is Paris." in done.stdout
    assert "route: client -> " in done.stdout and "[21-30] -> client" in done.stdout
    assert "first token after" in done.stdout and "stopping the swarm" in done.stdout
    # Every node is gone: the ports the demo announced are free again.
    base = int(re.search(r"bootstrap node on udp 127.0.0.1:(\d+)", done.stdout).group(1))
    for port in (base, base + 10, base + 11, base + 20, base + 21, base + 30, base + 31):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_a_prompt_sent_in_pipelined_chunks_gives_the_same_logits(client: DistributedModelForCausalLM) -> None:
    prompt_ids = client.encode_prompt(" ".join(PROMPTS), chat=True)
    assert len(prompt_ids) > 40
    logits = {}
    for chunk in (0, 8):
        client.options = dataclasses.replace(client.options, prefill_chunk=chunk)
        try:
            with client.inference_session(max_length=len(prompt_ids) + 1) as session:
                logits[chunk] = session.step(prompt_ids)
        finally:
            client.options = dataclasses.replace(client.options, prefill_chunk=SessionOptions().prefill_chunk)
    torch.testing.assert_close(logits[8], logits[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("waves", [None, 1, 2, 3], ids=["default", "lockstep", "two-waves", "one-per-hop"])
def test_generate_batch_gives_every_prompt_its_exact_continuation(
    client: DistributedModelForCausalLM, reference_tokens: dict[str, list[int]], waves: int | None
) -> None:
    streamed: dict[int, str] = {}

    def on_text(index: int, text: str) -> None:
        streamed[index] = streamed.get(index, "") + text

    results = client.generate_batch(
        PROMPTS, chat=True, max_new_tokens=MAX_NEW_TOKENS, on_text=on_text, waves=waves
    )
    for index, (prompt, result) in enumerate(zip(PROMPTS, results, strict=True)):
        assert result.token_ids == reference_tokens[prompt], prompt
        assert streamed.get(index, "") == result.text
        assert result.decode_tokens_per_s > 0 and len(result.route) == 3


def workers_decode_counts(client: DistributedModelForCausalLM) -> dict[str, tuple[int, int]]:
    """Each worker of the client's route: (decode batches, decode tokens) it has computed so far."""
    with client.inference_session(4) as session:
        route = session.route
    counts = {}
    for hop in route:
        pong = client.runtime.call(
            client.runtime.request(
                bytes.fromhex(hop["peer_id"]), parse_host_port(hop["address"]), MessageKind.PING, {}, 5.0
            )
        )
        compute = pong.metadata["compute"]
        counts[hop["layers"]] = (compute["decode_batches"], compute["decode_tokens"])
    return counts


def ping(
    client: DistributedModelForCausalLM, hop: dict[str, str], metadata: dict[str, bool]
) -> dict[str, Any]:
    """A hop's PONG metadata (its info; ``step_times`` if asked)."""
    peer, address = bytes.fromhex(hop["peer_id"]), parse_host_port(hop["address"])
    return client.runtime.call(
        client.runtime.request(peer, address, MessageKind.PING, metadata, 5.0)
    ).metadata


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="busy-polling needs two CPUs")
def test_a_lone_sessions_next_step_and_result_are_busy_polled_for_and_stay_exact(
    client: DistributedModelForCausalLM, reference_tokens: dict[str, list[int]]
) -> None:
    """Stepping one session token after token, every worker expects the next step around when the
    steps before foretell it and busy-polls then (Endpoint.expect_message), and the thread waiting
    for each result reads the socket itself, busy-polling around when it is due (MeshRuntime.
    await_result); whether a message lands within the window depends on the machine's timing, so
    the test counts the waits, not the catches, and checks that nothing changes the tokens. Each
    decode step after the first is foreseen: the workers' endpoints match it as it arrives
    (Endpoint.expect_frame), as the client's does its result."""
    prompt_ids = client.encode_prompt(PROMPTS[2], chat=True)
    assert client.runtime.endpoint is not None
    client_spins = client.runtime.result_spins
    results_matched = client.runtime.results_matched
    with client.inference_session(max_length=len(prompt_ids) + 16) as session:
        before = [ping(client, hop, {}) for hop in session.route]
        tokens = [int(session.step(prompt_ids).argmax())]
        for _ in range(15):
            tokens.append(int(session.step([tokens[-1]]).argmax()))
        after = [ping(client, hop, {}) for hop in session.route]
    assert tokens == reference_tokens[PROMPTS[2]][:16]
    # Five decode steps make a cadence; each later step's wait is armed once it is foreseeable.
    polls = [(then["busy_polls"], now["busy_polls"]) for then, now in zip(before, after, strict=True)]
    assert all(now[0] > then[0] and now[1] <= now[0] for then, now in polls)
    assert client.runtime.result_spins > client_spins
    # Each of the 15 decode steps is foreseen a forward or more before it comes; a loaded machine
    # may hold up a preparation (a 1 ms timer) past a step's arrival now and then.
    foreseen = [
        now["foreseen_steps"] - then["foreseen_steps"] for then, now in zip(before, after, strict=True)
    ]
    assert all(12 <= count <= 15 for count in foreseen), foreseen
    assert 12 <= client.runtime.results_matched - results_matched <= 15


def test_a_session_dropped_without_close_frees_its_workers_caches_and_its_pending_step(
    client: DistributedModelForCausalLM,
) -> None:
    prompt_ids = client.encode_prompt(PROMPTS[0], chat=True)
    session = client.inference_session(max_length=len(prompt_ids) + 4)
    route = session.route
    token = int(session.step(prompt_ids).argmax())
    session.step([token])  # the wait encoded the next step ahead: its id is registered
    assert [ping(client, hop, {})["sessions"] for hop in route] == [1, 1, 1]
    assert len(client.runtime._steps) == 1
    del session
    gc.collect()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(ping(client, hop, {})["sessions"] for hop in route):
        time.sleep(0.05)
    assert [ping(client, hop, {})["sessions"] for hop in route] == [0, 0, 0]  # not after 300 s
    assert not client.runtime._steps
    assert not client.runtime._expected_results  # nor the expected result of its step encoded ahead


def test_workers_report_each_decode_steps_forward_time_and_the_swarm_adds_the_rest(
    client: DistributedModelForCausalLM,
) -> None:
    prompt_ids = client.encode_prompt(PROMPTS[0], chat=True)
    chains: dict[int, float] = {}
    with client.inference_session(max_length=len(prompt_ids) + 6) as session:
        route = session.route
        token = int(session.step(prompt_ids).argmax())
        prefill_step = session.last_step_id
        for _ in range(5):
            token = int(session.step([token]).argmax())
            chains[session.last_step_id] = session.last_chain_s

    forwards = [dict(ping(client, hop, {"step_times": True})["step_times"]) for hop in route]
    assert "step_times" not in ping(client, route[0], {})  # probes stay small
    for step_id, chain in chains.items():
        times = [worker[step_id] for worker in forwards]  # every hop computed every decode step
        assert all(0 < t for t in times) and sum(times) < chain, (step_id, times, chain)
    assert all(prefill_step not in worker for worker in forwards)  # decode steps only


def test_generate_batch_computes_each_round_as_one_batch_in_every_worker(
    client: DistributedModelForCausalLM,
) -> None:
    before = workers_decode_counts(client)
    client.generate_batch(PROMPTS, chat=True, max_new_tokens=6, ignore_eos=True, waves=1)
    after = workers_decode_counts(client)
    # 6 tokens: the first from the prompt's logits, then 5 decode rounds of 4 sequences each.
    for layers, (batches, tokens) in after.items():
        assert (batches - before[layers][0], tokens - before[layers][1]) == (5, 20), layers


def test_generate_batch_refuses_zero_waves(client: DistributedModelForCausalLM) -> None:
    with pytest.raises(ValueError, match="waves"):
        client.generate_batch(PROMPTS, waves=0)


def test_a_client_closed_while_it_looks_the_swarm_up_leaves_no_work_pending(
    smollm2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty = LocalSwarm(tmp_path)
    empty.start_bootstrap()
    try:
        empty.wait_until(lambda r: not r["models"], 60, "the bootstrap node")
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            model = DistributedModelForCausalLM.from_pretrained(smollm2_dir, [empty.bootstrap])
            model.close()  # its lookup, started by from_pretrained, still waits for workers
            del model
            gc.collect()
    finally:
        empty.stop()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
