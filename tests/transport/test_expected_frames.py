"""Endpoint.expect_frame: a message known in advance but for its request id and its tensor is matched
by the native side as it arrives, its tensor copied out, and reported to its own callback."""

from __future__ import annotations

import asyncio
import inspect
import os
import select
import threading
import time
from typing import Any

import pytest
import torch
from transport_helpers import new_key, run

from inferencemesh import _core
from inferencemesh.protocol.frames import dtype_code, encode_message, pack_metadata
from inferencemesh.transport import Endpoint, FrameWait, TransportConfig

KIND, FLAGS = 9, 1
METADATA = {"session": b"s" * 16, "position": 40}
SHAPE = (1, 8)


def expect(endpoint: Endpoint, arrivals: list[tuple[bytes, int]]) -> tuple[int, torch.Tensor]:
    """Expects the frame of METADATA with a request id in 5..10 and a float32 [1, 8] tensor."""
    token, memory = endpoint.expect_frame(
        KIND,
        FLAGS,
        pack_metadata(METADATA),
        (5, 10),
        dtype_code(torch.float32),
        SHAPE,
        lambda peer_id, request_id: arrivals.append((peer_id, request_id)),
    )
    return token, torch.frombuffer(memory, dtype=torch.float32).view(SHAPE)


def message(
    request_id: int, tensor: torch.Tensor, metadata: dict[str, Any] = METADATA, flags: int = FLAGS
) -> Any:
    return encode_message(KIND, request_id, metadata, [tensor], flags=flags)


async def peers() -> tuple[Endpoint, Endpoint, list[int]]:
    """Two endpoints; the second's handler keeps the request ids of the frames it gets."""
    a = await Endpoint.start(new_key(), "127.0.0.1", 0)
    b = await Endpoint.start(new_key(), "127.0.0.1", 0)
    handled: list[int] = []
    b.set_handler(lambda peer_id, buffer: handled.append(_core.decode_frame(buffer).request_id))
    return a, b, handled


async def until(condition: Any) -> None:
    deadline = time.monotonic() + 5
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def test_the_expected_frame_arrives_copied_and_every_other_frame_as_usual() -> None:
    async def scenario() -> None:
        a, b, handled = await peers()  # handled: request ids of the frames the handler got
        arrivals: list[tuple[bytes, int]] = []
        _, into = expect(b, arrivals)
        tensor = torch.randn(SHAPE)
        near_misses = [
            message(4, tensor),  # request id below the range
            message(11, tensor),  # above it
            message(6, tensor, dict(METADATA, position=41)),  # other metadata
            message(6, tensor, flags=0),  # other flags
            message(6, tensor.to(torch.float16)),  # other dtype
            message(6, torch.randn(2, 4)),  # other shape, same size
            encode_message(KIND, 6, METADATA, [tensor, tensor], flags=FLAGS),  # two tensors
        ]
        for n, frame in enumerate(near_misses, 1):
            a.send_or_report(b.peer_id, ("127.0.0.1", b.port), frame, pytest.fail)
            await until(lambda n=n: len(handled) == n)
        assert handled == [4, 11, 6, 6, 6, 6, 6] and not arrivals
        a.send_or_report(b.peer_id, ("127.0.0.1", b.port), message(7, tensor), pytest.fail)
        await until(lambda: arrivals)
        assert arrivals == [(a.peer_id, 7)] and len(handled) == 7
        assert torch.equal(into, tensor)
        # Once taken, the expectation is gone: the same frame again goes to the handler.
        a.send_or_report(b.peer_id, ("127.0.0.1", b.port), message(8, tensor), pytest.fail)
        await until(lambda: len(handled) == 8)
        assert handled[-1] == 8 and len(arrivals) == 1
        await a.close()
        await b.close()

    run(scenario())


def test_a_forgotten_expectation_lets_its_frame_through_and_one_metadata_is_expected_once() -> None:
    async def scenario() -> None:
        a, b, handled = await peers()
        arrivals: list[tuple[bytes, int]] = []
        token, _ = expect(b, arrivals)
        with pytest.raises(ValueError, match="already expected"):
            expect(b, arrivals)
        b.forget_frame(token)
        b.forget_frame(token)  # twice, or an unknown token: nothing happens
        a.send_or_report(b.peer_id, ("127.0.0.1", b.port), message(7, torch.randn(SHAPE)), pytest.fail)
        await until(lambda: handled)
        assert handled == [7] and not arrivals
        expect(b, arrivals)  # the metadata is free again
        with pytest.raises(ValueError):
            b.expect_frame(KIND, 0, b"other", (0, 1), 250, (1,), lambda *_: None)  # no such dtype
        await a.close()
        await b.close()

    run(scenario())


def test_expected_frames_give_their_streams_credit_back() -> None:
    """A matched frame's stream is finished natively, as the handler's return finishes any other:
    with a peer allowed 8 streams at once, 40 expected frames in a row all arrive."""

    async def scenario() -> list[int]:
        a = await Endpoint.start(new_key(), "127.0.0.1", 0)
        b = await Endpoint.start(new_key(), "127.0.0.1", 0, TransportConfig(max_streams=8))
        arrivals: list[tuple[bytes, int]] = []
        b.set_handler(lambda peer_id, buffer: pytest.fail("an expected frame reached the handler"))
        for n in range(40):
            expect(b, arrivals)
            a.send_or_report(
                b.peer_id, ("127.0.0.1", b.port), message(5 + n % 6, torch.randn(SHAPE)), pytest.fail
            )
            await until(lambda n=n: len(arrivals) == n + 1)
        await a.close()
        await b.close()
        return [request_id for _, request_id in arrivals]

    assert run(scenario()) == [5 + n % 6 for n in range(40)]


def test_a_thread_waiting_for_an_expected_frame_reads_it_itself() -> None:
    """await_frame: the waiting thread reads the socket (sleeping, then busy-polling) and takes its
    frame with no callback on the loop's thread; other messages still reach the handler."""

    async def scenario() -> None:
        a, b, handled = await peers()
        arrivals: list[tuple[bytes, int]] = []
        loop = asyncio.get_running_loop()
        address = ("127.0.0.1", b.port)
        waits: dict[str, FrameWait] = {}

        def wait(sleep_s: float, spin_s: float) -> tuple[FrameWait, int, bytes]:
            """As a caller does: waits again while other messages end a wait early."""
            deadline = time.monotonic() + sleep_s + spin_s
            outcome = b.await_frame(token, sleep_s, spin_s)
            while outcome[0] == FrameWait.TIMED_OUT and time.monotonic() < deadline:
                left = deadline - time.monotonic()
                outcome = b.await_frame(token, max(0.0, left - spin_s), min(spin_s, left))
            return outcome

        async def wait_while(
            sending: list[Any], sleep_s: float, spin_s: float, arrives: int = 0
        ) -> FrameWait:
            waiting = loop.run_in_executor(None, wait, sleep_s, spin_s)
            for frame in sending:
                await asyncio.sleep(0.05)
                a.send_or_report(b.peer_id, address, frame, pytest.fail)
            outcome, request_id, sender = await waiting
            if outcome == FrameWait.ARRIVED:
                assert (request_id, sender) == (arrives, a.peer_id)
            return outcome

        token, into = expect(b, arrivals)
        waits["nothing came"] = await wait_while([], 0.05, 0.01)
        # Sleeping: another message first (to the handler), then the frame.
        tensor = torch.randn(SHAPE)
        waits["asleep"] = await wait_while([message(4, tensor), message(7, tensor)], 5.0, 0.0, arrives=7)
        assert torch.equal(into, tensor)
        await until(lambda: handled)
        # Busy-polling.
        token, into = expect(b, arrivals)
        tensor = torch.randn(SHAPE)
        waits["spinning"] = await wait_while([message(8, tensor)], 0.0, 5.0, arrives=8)
        assert torch.equal(into, tensor)
        assert handled == [4] and not arrivals  # the loop's thread saw the other message only
        # Taken before anyone waited: on_arrival ran, and the waiter learns at once.
        token, _ = expect(b, arrivals)
        a.send_or_report(b.peer_id, address, message(9, tensor), pytest.fail)
        await until(lambda: arrivals)
        waits["taken before"] = b.await_frame(token, 5.0, 0.0)[0]
        # Withdrawn, or the endpoint closed, while a thread waits: the wait ends.
        token, _ = expect(b, arrivals)
        waiting = loop.run_in_executor(None, b.await_frame, token, 5.0, 0.0)
        await asyncio.sleep(0.05)
        started = time.monotonic()
        b.forget_frame(token)
        waits["forgotten"] = (await waiting)[0]
        assert time.monotonic() - started < 1.0
        token, _ = expect(b, arrivals)
        waiting = loop.run_in_executor(None, b.await_frame, token, 5.0, 0.0)
        await asyncio.sleep(0.05)
        await b.close()
        waits["closed"] = (await waiting)[0]
        await a.close()
        assert arrivals == [(a.peer_id, 9)]
        assert waits == {
            "nothing came": FrameWait.TIMED_OUT,
            "asleep": FrameWait.ARRIVED,
            "spinning": FrameWait.ARRIVED,
            "taken before": FrameWait.NOT_EXPECTED,
            "forgotten": FrameWait.NOT_EXPECTED,
            "closed": FrameWait.NOT_EXPECTED,
        }

    run(scenario())


def _sleeps(thread_id: int) -> int:
    """How often a thread of this process went to sleep (its voluntary context switches)."""
    with open(f"/proc/self/task/{thread_id}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc")


def test_the_datagrams_a_waiting_thread_reads_wake_no_watcher_of_the_loops_fd() -> None:
    """While a thread other than the loop's waits in await_frame, the datagram_fd that the loop's
    thread watches stays unreadable: the frame that thread takes wakes no watcher. Without such a
    waiter, a datagram wakes them as before."""

    async def scenario() -> tuple[int, int, int]:
        a, b, handled = await peers()
        address = ("127.0.0.1", b.port)
        a.send_or_report(b.peer_id, address, message(1, torch.randn(SHAPE)), pytest.fail)
        await until(lambda: handled)  # connected
        await asyncio.sleep(0.2)  # the handshake's last packets are in
        # A watcher like the loop's selector, on a thread of its own that does nothing else.
        stop_read, stop_write = os.pipe()
        watcher = select.epoll()
        watcher.register(b._native.datagram_fd, select.EPOLLIN)
        watcher.register(stop_read, select.EPOLLIN)
        watching: list[int] = []

        def watch() -> None:
            watching.append(threading.get_native_id())
            while all(fd != stop_read for fd, _ in watcher.poll()):
                time.sleep(0.001)  # the loop's thread reads the datagram meanwhile

        thread = threading.Thread(target=watch)
        thread.start()
        await until(lambda: watching)
        await asyncio.sleep(0.1)  # asleep in poll
        asleep = _sleeps(watching[0])
        token, into = expect(b, [])
        tensor = torch.randn(SHAPE)
        waiting = asyncio.get_running_loop().run_in_executor(None, b.await_frame, token, 0.0, 5.0)
        await asyncio.sleep(0.05)
        a.send_or_report(b.peer_id, address, message(6, tensor), pytest.fail)
        outcome, request_id, _ = await waiting
        while_waited = _sleeps(watching[0])
        assert (outcome, request_id) == (FrameWait.ARRIVED, 6) and torch.equal(into, tensor)
        a.send_or_report(b.peer_id, address, message(3, tensor), pytest.fail)
        await until(lambda: handled == [1, 3])
        await asyncio.sleep(0.05)
        after_another = _sleeps(watching[0])
        os.write(stop_write, b"x")
        thread.join()
        for fd in (stop_read, stop_write):
            os.close(fd)
        watcher.close()
        await a.close()
        await b.close()
        return asleep, while_waited, after_another

    asleep, while_waited, after_another = run(scenario())
    assert while_waited == asleep  # not woken by the frame the waiting thread took
    assert after_another > while_waited  # woken by a datagram nobody waited for


def test_an_awaited_frames_ack_goes_at_its_holds_end_however_long_the_wait_was_to_last() -> None:
    """A thread that awaits a frame arms the endpoint's timer ahead for the frame's held ACK, for the
    end of its wait (so that the frame's read need not: docs/transport.md). A frame that comes long
    before that end still has its ACK go when its hold ends: the sender's bytes in flight drain in
    milliseconds."""

    async def scenario() -> tuple[FrameWait, float]:
        a, b, handled = await peers()
        address = ("127.0.0.1", b.port)
        a.send_or_report(b.peer_id, address, message(1, torch.randn(SHAPE)), pytest.fail)
        await until(lambda: handled)  # connected
        await asyncio.sleep(0.2)
        token, _ = expect(b, [])
        waiting = asyncio.get_running_loop().run_in_executor(None, b.await_frame, token, 0.0, 3.0)
        await asyncio.sleep(0.05)
        sent = time.monotonic()
        a.send_or_report(b.peer_id, address, message(6, torch.randn(SHAPE)), pytest.fail)
        outcome = (await waiting)[0]

        def in_flight() -> int:
            stats = a.peer_stats(b.peer_id)
            assert stats is not None
            return stats.bytes_in_flight

        while in_flight() > 0 and time.monotonic() - sent < 3.0:
            await asyncio.sleep(0.001)
        acknowledged_after = time.monotonic() - sent
        await a.close()
        await b.close()
        return outcome, acknowledged_after

    outcome, acknowledged_after = run(scenario())
    assert outcome == FrameWait.ARRIVED
    # ~2 ms here: the hold's 0.5 ms and the wake-ups; the timer armed for the wait's end would have
    # held it 3 s, and the reset of the frame's stream, which an ACK would otherwise ride, 25 ms.
    assert acknowledged_after < 0.02


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="busy-polling needs two CPUs")
def test_a_busy_poll_for_an_expected_frame_takes_it_and_runs_its_callback_at_once() -> None:
    async def scenario() -> tuple[list[tuple[int, bool]], tuple[int, int]]:
        a, b, handled = await peers()
        a.send_or_report(b.peer_id, ("127.0.0.1", b.port), message(1, torch.randn(SHAPE)), pytest.fail)
        await until(lambda: handled)  # connected
        arrivals: list[tuple[int, bool]] = []  # (request id, taken while busy-polling)

        def arrived(peer_id: bytes, request_id: int) -> None:
            polling = any(frame.function == "_await_frame" for frame in inspect.stack())
            arrivals.append((request_id, polling))

        token, _ = b.expect_frame(
            KIND, FLAGS, pack_metadata(METADATA), (5, 10), dtype_code(torch.float32), SHAPE, arrived
        )
        b.expect_message(asyncio.get_running_loop().time() + 0.1, 0.05, token)
        # The loop's thread busy-polls from 50 to 150 ms: another thread sends meanwhile.
        sender = threading.Timer(
            0.1,
            a.send_or_report,
            (b.peer_id, ("127.0.0.1", b.port), message(6, torch.randn(SHAPE)), pytest.fail),
        )
        sender.start()
        await until(lambda: arrivals)
        sender.join()
        counts = (b.busy_polls, b.busy_polls_caught)
        await a.close()
        await b.close()
        assert handled == [1]
        return arrivals, counts

    assert run(scenario()) == ([(6, True)], (1, 1))
