"""Steps and bad requests against a real worker process: bad requests get typed errors and the worker
keeps serving; steps run in order, exactly."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from inferencemesh import _core
from inferencemesh.cli.local_swarm import LocalSwarm
from inferencemesh.client.model import DistributedModelForCausalLM
from inferencemesh.client.route import entry_address
from inferencemesh.client.runtime import MeshRuntime
from inferencemesh.p2p.lookup import find_block_providers
from inferencemesh.p2p.records import ProviderEntry
from inferencemesh.protocol.frames import decode_message, encode_message
from inferencemesh.protocol.messages import (
    BadRequest,
    LengthExceeded,
    MessageKind,
    OutOfOrder,
    TooLarge,
    UnknownSession,
    WorkerError,
    WrongDtype,
    WrongModel,
    WrongShape,
)
from inferencemesh.transport.errors import TransportError
from tests.swarm.conftest import MAX_NEW_TOKENS, PROMPTS

HIDDEN = 576


@pytest.fixture(scope="module")
def runtime(swarm: LocalSwarm) -> Iterator[MeshRuntime]:
    runtime = MeshRuntime([swarm.bootstrap])
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def first_worker(runtime: MeshRuntime, client: DistributedModelForCausalLM) -> ProviderEntry:
    providers = runtime.call(find_block_providers(runtime.dht, client.model_id, 30))
    (entry,) = providers[0]
    return entry


def request(runtime: MeshRuntime, worker: ProviderEntry, kind: MessageKind, metadata: dict[str, Any]) -> Any:
    return runtime.call(runtime.request(worker.peer_id, entry_address(worker), kind, metadata, 5.0))


def open_session(runtime: MeshRuntime, worker: ProviderEntry, model_id: str, max_length: int = 16) -> tuple:
    session_id, token = os.urandom(16), os.urandom(16)
    request(
        runtime,
        worker,
        MessageKind.OPEN_SESSION,
        {"model_id": model_id, "session_id": session_id, "token": token, "max_length": max_length},
    )
    return session_id, token


def send_steps(
    runtime: MeshRuntime,
    worker: ProviderEntry,
    session_id: bytes,
    token: bytes,
    steps: list[tuple[int, int, Any]],
    wait_s: float = 10.0,
    client: bytes | None = None,
    extra: dict[str, Any] | None = None,
) -> list[Any]:
    """Sends one-hop STEPs in the given order without waiting in between: (id rank, position, hidden),
    where the id rank orders the step ids as a client would have numbered them. Returns each step's
    result tensor, its WorkerError, or None when nothing came back within ``wait_s``."""

    async def go() -> list[Any]:
        allocated = sorted(runtime.new_step() for _ in steps)  # ids in the order the client made them
        outcomes = []
        for rank, position, hidden in steps:
            step_id, _ = allocated[rank]
            metadata = {
                "client": client or runtime.identity.peer_id,
                "session_id": session_id,
                "token": token,
                "position": position,
                "last_only": False,
                "chain": [],
                **(extra or {}),
            }
            frame = encode_message(MessageKind.STEP, step_id, metadata, [hidden])
            await runtime.endpoint.send(worker.peer_id, entry_address(worker), frame)
        for rank, _, _ in steps:
            step_id, result = allocated[rank]
            try:
                message = await asyncio.wait_for(asyncio.wrap_future(result), wait_s)
                outcomes.append(message.tensors[0])
            except WorkerError as exc:
                outcomes.append(exc)
            except TimeoutError:
                outcomes.append(None)
            runtime.forget_step(step_id)
        return outcomes

    return runtime.call(go())


def step(
    runtime: MeshRuntime,
    worker: ProviderEntry,
    session_id: bytes,
    token: bytes,
    position: int,
    hidden: Any,
    client: bytes | None = None,
    extra: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Sends a one-hop STEP (``extra``: more metadata); returns the result tensor or raises the
    worker's typed error."""
    (outcome,) = send_steps(
        runtime, worker, session_id, token, [(0, position, hidden)], client=client, extra=extra
    )
    if isinstance(outcome, WorkerError):
        raise outcome
    assert outcome is not None, "no answer to the step"
    return outcome


def one_shot(
    runtime: MeshRuntime, worker: ProviderEntry, model_id: str, hidden: torch.Tensor
) -> torch.Tensor:
    """The worker's output for ``hidden`` as one step of a fresh session: what split steps must match."""
    session_id, token = open_session(runtime, worker, model_id)
    return step(runtime, worker, session_id, token, 0, hidden)


def test_wrong_model_and_oversized_session_are_refused(
    runtime: MeshRuntime, first_worker: ProviderEntry, client: DistributedModelForCausalLM
) -> None:
    with pytest.raises(WrongModel, match="serves smollm2"):
        open_session(runtime, first_worker, "some-other-model-0123456789abcdef")
    with pytest.raises(TooLarge, match="max_length"):
        open_session(runtime, first_worker, client.model_id, max_length=10**9)
    with pytest.raises(BadRequest, match="session_id"):
        request(runtime, first_worker, MessageKind.OPEN_SESSION, {"model_id": client.model_id})


def test_wrong_shape_dtype_and_position_get_typed_errors(
    runtime: MeshRuntime, first_worker: ProviderEntry, client: DistributedModelForCausalLM
) -> None:
    session_id, token = open_session(runtime, first_worker, client.model_id, max_length=4)
    with pytest.raises(WrongShape, match=r"\[tokens, 576\]"):
        step(runtime, first_worker, session_id, token, 0, torch.zeros(1, 100))
    with pytest.raises(WrongShape):
        step(runtime, first_worker, session_id, token, 0, torch.zeros(1, 1, HIDDEN))
    with pytest.raises(WrongDtype):
        step(runtime, first_worker, session_id, token, 0, torch.zeros(1, HIDDEN, dtype=torch.int64))
    with pytest.raises(OutOfOrder):
        step(runtime, first_worker, session_id, token, 3, torch.zeros(1, HIDDEN))
    with pytest.raises(LengthExceeded):
        step(runtime, first_worker, session_id, token, 0, torch.zeros(5, HIDDEN))
    out = step(runtime, first_worker, session_id, token, 0, torch.zeros(4, HIDDEN))
    assert out.shape == (4, HIDDEN) and torch.isfinite(out).all()
    with pytest.raises(LengthExceeded):  # the session is full now
        step(runtime, first_worker, session_id, token, 4, torch.zeros(1, HIDDEN))


def test_malformed_bursts_are_refused_and_a_burst_of_one_runs_at_once(
    runtime: MeshRuntime, first_worker: ProviderEntry, client: DistributedModelForCausalLM
) -> None:
    session_id, token = open_session(runtime, first_worker, client.model_id, max_length=4)
    hidden = torch.zeros(1, HIDDEN)
    for burst in ([1], [1, 0], [-1, 2], [1, 10**9], ["a", 2], [1, True], "burst"):
        with pytest.raises(BadRequest, match="burst"):
            step(runtime, first_worker, session_id, token, 0, hidden, extra={"burst": burst})
    out = step(runtime, first_worker, session_id, token, 0, hidden, extra={"burst": [5, 1]})
    assert out.shape == (1, HIDDEN) and torch.isfinite(out).all()


def test_sessions_are_isolated_between_clients(
    runtime: MeshRuntime, swarm: LocalSwarm, first_worker: ProviderEntry, client: DistributedModelForCausalLM
) -> None:
    session_id, token = open_session(runtime, first_worker, client.model_id)
    with pytest.raises(UnknownSession):
        step(runtime, first_worker, os.urandom(16), token, 0, torch.zeros(1, HIDDEN))
    with pytest.raises(UnknownSession):
        step(runtime, first_worker, session_id, os.urandom(16), 0, torch.zeros(1, HIDDEN))
    stranger = MeshRuntime([swarm.bootstrap])
    try:
        # Even knowing the id and the token, another client cannot step or close the session: sessions are
        # keyed by the authenticated peer id of the client that opened them.
        with pytest.raises(UnknownSession):
            step(stranger, first_worker, session_id, token, 0, torch.zeros(1, HIDDEN))
        with pytest.raises(UnknownSession):
            request(
                stranger, first_worker, MessageKind.CLOSE_SESSION, {"session_id": session_id, "token": token}
            )
    finally:
        stranger.close()
    request(runtime, first_worker, MessageKind.CLOSE_SESSION, {"session_id": session_id, "token": token})
    with pytest.raises(UnknownSession):
        step(runtime, first_worker, session_id, token, 0, torch.zeros(1, HIDDEN))


def test_oversized_malformed_and_unknown_messages(
    runtime: MeshRuntime, first_worker: ProviderEntry, client: DistributedModelForCausalLM
) -> None:
    session_id, token = open_session(runtime, first_worker, client.model_id, max_length=16)
    with pytest.raises(TooLarge, match="8192"):
        step(runtime, first_worker, session_id, token, 0, torch.zeros(8193, HIDDEN))
    with pytest.raises(BadRequest, match="unknown message kind"):
        request(runtime, first_worker, 200, {})  # type: ignore[arg-type]
    # A valid header over a corrupt tensor table: the sender's transport passes it, the worker must not.
    garbage = bytearray(encode_message(MessageKind.PING, 1, {}, [torch.zeros(4)]).to_bytes())
    garbage[_core.FRAME_HEADER_SIZE + 1] = 200  # the table's first dtype byte (metadata is the empty map)
    garbage = bytes(garbage)

    async def send_garbage() -> Any:
        return await runtime.endpoint.request(first_worker.peer_id, entry_address(first_worker), garbage, 5.0)

    try:
        reply = decode_message(runtime.call(send_garbage()))
        assert reply.kind == MessageKind.ERROR and reply.metadata["code"] == BadRequest.code
    except TransportError as exc:  # the transport may reject the frame before the worker sees it
        assert "frame" in str(exc).lower()
    with pytest.raises(WorkerError):
        request(runtime, first_worker, MessageKind.FORWARD, {"model_id": client.model_id})


def test_worker_still_serves_exactly_after_bad_requests(
    client: DistributedModelForCausalLM, reference_tokens: dict[str, list[int]]
) -> None:
    result = client.generate(PROMPTS[0], chat=True, max_new_tokens=MAX_NEW_TOKENS)
    assert result.token_ids == reference_tokens[PROMPTS[0]]


def test_stateless_forward_matches_a_session_prefill(
    runtime: MeshRuntime, first_worker: ProviderEntry, client: DistributedModelForCausalLM
) -> None:
    hidden = client.head.embed(client.encode_prompt(PROMPTS[0], chat=True))
    forward = runtime.call(
        runtime.request(
            first_worker.peer_id,
            entry_address(first_worker),
            MessageKind.FORWARD,
            {"model_id": client.model_id},
            10.0,
            [hidden],
        )
    )
    session_id, token = open_session(runtime, first_worker, client.model_id, max_length=hidden.shape[0])
    via_session = step(runtime, first_worker, session_id, token, 0, hidden)
    assert forward.kind == MessageKind.FORWARD_RESULT
    torch.testing.assert_close(forward.tensors[0], via_session, rtol=0, atol=1e-5)


def test_steps_that_arrive_out_of_order_run_in_the_order_the_client_sent_them(
    runtime: MeshRuntime, first_worker: ProviderEntry, client: DistributedModelForCausalLM
) -> None:
    torch.manual_seed(3)
    hidden = torch.randn(8, HIDDEN)
    expected = one_shot(runtime, first_worker, client.model_id, hidden)
    session_id, token = open_session(runtime, first_worker, client.model_id)
    # The second half arrives first: the worker holds it until the first half has run.
    later, earlier = send_steps(
        runtime, first_worker, session_id, token, [(1, 4, hidden[4:]), (0, 0, hidden[:4])]
    )
    # Split or whole, the same rows: equal up to float32 rounding of differently blocked matmuls.
    torch.testing.assert_close(torch.cat([earlier, later]), expected, rtol=1e-4, atol=1e-4)


def test_a_step_overtaken_by_a_replay_from_position_zero_is_dropped(
    runtime: MeshRuntime, first_worker: ProviderEntry, client: DistributedModelForCausalLM
) -> None:
    torch.manual_seed(4)
    hidden = torch.randn(6, HIDDEN)
    session_id, token = open_session(runtime, first_worker, client.model_id)
    # Step 0 at position 3 waits for a step that never comes; step 1 starts over at position 0
    # (what a client replaying after a failover sends), so step 0 is stale: no result, no error.
    stale, replay = send_steps(
        runtime,
        first_worker,
        session_id,
        token,
        [(0, 3, hidden[3:4]), (1, 0, hidden[:3])],
        wait_s=3.0,  # longer than the worker's REORDER_WAIT_S: an OutOfOrder report would show
    )
    assert stale is None
    assert replay.shape == (3, HIDDEN)
    # The session continues from the replay, at position 3.
    out = step(runtime, first_worker, session_id, token, 3, hidden[3:])
    expected = one_shot(runtime, first_worker, client.model_id, hidden)
    torch.testing.assert_close(torch.cat([replay, out]), expected, rtol=1e-4, atol=1e-4)


def prepared_steps(runtime: MeshRuntime, worker: ProviderEntry) -> int:
    return request(runtime, worker, MessageKind.PING, {}).metadata["prepared_steps"]


def test_decode_steps_go_out_in_the_message_encoded_ahead_and_stay_exact(
    runtime: MeshRuntime, first_worker: ProviderEntry, client: DistributedModelForCausalLM
) -> None:
    torch.manual_seed(5)
    hidden = torch.randn(6, HIDDEN)
    ours, our_token = open_session(runtime, first_worker, client.model_id)
    other, other_token = open_session(runtime, first_worker, client.model_id)
    expected = one_shot(runtime, first_worker, client.model_id, hidden)
    before = prepared_steps(runtime, first_worker)
    outputs = [step(runtime, first_worker, ours, our_token, 0, hidden[:2])]
    for position in range(2, 6):
        # The other session's steps take step ids in between: the message encoded ahead gets the id
        # of the step that arrives, or its result would not reach us.
        step(runtime, first_worker, other, other_token, position - 2, hidden[:1])
        # A client spends a while on its LM head between two steps; the worker encodes meanwhile.
        time.sleep(0.05)
        # From position 4 on the metadata changes (last_only): not the step foretold, encoded anew.
        extra = {"last_only": True} if position >= 4 else None
        row = hidden[position : position + 1]
        outputs.append(step(runtime, first_worker, ours, our_token, position, row, extra=extra))
    torch.testing.assert_close(torch.cat(outputs), expected, rtol=1e-4, atol=1e-4)
    # Ours at 2, 3 and 5 (4 changed its metadata); the other session's at 1, 2 and 3.
    assert prepared_steps(runtime, first_worker) - before == 6


def test_a_foreseen_step_is_checked_like_any_other(
    runtime: MeshRuntime, first_worker: ProviderEntry, client: DistributedModelForCausalLM
) -> None:
    torch.manual_seed(6)
    hidden = torch.randn(4, HIDDEN)
    session_id, token = open_session(runtime, first_worker, client.model_id, max_length=4)
    expected = one_shot(runtime, first_worker, client.model_id, hidden)
    before = prepared_steps(runtime, first_worker)
    outputs = [step(runtime, first_worker, session_id, token, 0, hidden[:2])]

    def foreseen(position: int, row: torch.Tensor) -> torch.Tensor:
        """A step with the metadata the worker foresaw for the session's next step."""
        time.sleep(0.05)  # the worker encodes the next step's message meanwhile
        return step(runtime, first_worker, session_id, token, position, row)

    with pytest.raises(WrongDtype):
        foreseen(2, hidden[2:3].double())
    with pytest.raises(WrongShape):
        foreseen(2, torch.randn(1, HIDDEN + 1))
    outputs += [foreseen(2, hidden[2:3]), foreseen(3, hidden[3:4])]
    # One-row and four-row forwards round differently (other kernels): ~1e-4 on random inputs.
    torch.testing.assert_close(torch.cat(outputs), expected, rtol=1e-3, atol=1e-3)
    assert prepared_steps(runtime, first_worker) - before == 2
    with pytest.raises(LengthExceeded):
        foreseen(4, hidden[3:4])
    request(runtime, first_worker, MessageKind.CLOSE_SESSION, {"session_id": session_id, "token": token})
    with pytest.raises(UnknownSession):
        foreseen(4, hidden[3:4])


def test_a_foreseen_step_that_finds_its_session_busy_waits_its_turn(
    runtime: MeshRuntime, first_worker: ProviderEntry, client: DistributedModelForCausalLM
) -> None:
    """The endpoint takes a foreseen step as it arrives; if its session has moved on meanwhile (here a
    later step came first and waits for it), the step takes the way of any step instead of starting."""
    torch.manual_seed(7)
    hidden = torch.randn(4, HIDDEN)
    session_id, token = open_session(runtime, first_worker, client.model_id)
    expected = one_shot(runtime, first_worker, client.model_id, hidden)
    before = request(runtime, first_worker, MessageKind.PING, {}).metadata
    outputs = [step(runtime, first_worker, session_id, token, 0, hidden[:2])]
    time.sleep(0.05)  # the worker foresees the step at position 2 meanwhile
    # Position 3 (a later step id) arrives first and waits; then the foreseen one, at 2.
    later, foreseen = send_steps(
        runtime, first_worker, session_id, token, [(1, 3, hidden[3:4]), (0, 2, hidden[2:3])]
    )
    outputs += [foreseen, later]
    torch.testing.assert_close(torch.cat(outputs), expected, rtol=1e-3, atol=1e-3)
    after = request(runtime, first_worker, MessageKind.PING, {}).metadata
    assert after["foreseen_steps"] - before["foreseen_steps"] == 1  # taken by the endpoint ...
    assert after["prepared_steps"] - before["prepared_steps"] == 1  # ... and sent in its message
