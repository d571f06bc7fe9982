"""Behaviour of the QUIC endpoint between endpoints in this process, on loopback."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import os
import socket
import threading
import time

import pytest
import torch
from transport_helpers import ECHO, frame, metadata_of, new_key, run

from inferencemesh import _core
from inferencemesh.protocol.frames import decode_message, encode_message
from inferencemesh.transport import (
    Endpoint,
    EndpointClosed,
    FrameTooLarge,
    HandshakeFailed,
    PeerIdMismatch,
    PeerUnreachable,
    RemoteError,
    RequestTimeout,
    TransportConfig,
)


async def pair(
    config_a: TransportConfig | None = None, config_b: TransportConfig | None = None, host: str = "127.0.0.1"
) -> tuple[Endpoint, Endpoint]:
    a = await Endpoint.start(new_key(), host, 0, config_a)
    b = await Endpoint.start(new_key(), host, 0, config_b)
    return a, b


def echo(peer_id: bytes, buffer: _core.Buffer) -> _core.Buffer:
    return buffer


def test_peer_id_is_sha256_of_the_public_key() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    async def main() -> None:
        seed = new_key()
        public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        ep = await Endpoint.start(seed, "127.0.0.1", 0)
        assert ep.peer_id == hashlib.sha256(public).digest()
        assert ep.port > 0
        await ep.close()

    run(main())


@pytest.mark.parametrize("loop_reads_socket", [True, False], ids=["loop-reads", "io-thread-reads"])
def test_echo_of_tensors_roundtrips_exactly(loop_reads_socket: bool) -> None:
    async def main() -> None:
        config = TransportConfig(loop_reads_socket=loop_reads_socket)
        a, b = await pair(config, config)
        b.set_busy(True)  # lends the socket to the I/O thread, or nothing when it reads anyway
        b.set_busy(False)
        seen: list[bytes] = []

        def handler(peer_id: bytes, buffer: _core.Buffer) -> object:
            seen.append(peer_id)
            request = decode_message(buffer)
            return encode_message(
                request.kind + 100, request.request_id, request.metadata, [t * 2 for t in request.tensors]
            )

        b.set_handler(handler)
        hidden = torch.randn(3, 7, 576)
        ids = torch.arange(21, dtype=torch.int64).reshape(3, 7)
        request = encode_message(5, 42, {"session": "s1"}, [hidden, ids])
        response = decode_message(await a.request(b.peer_id, ("127.0.0.1", b.port), request, timeout=10))
        assert (response.kind, response.request_id, response.metadata) == (105, 42, {"session": "s1"})
        assert torch.equal(response.tensors[0], hidden * 2)
        assert torch.equal(response.tensors[1], ids * 2)
        assert seen == [a.peer_id]  # the handler sees the authenticated peer id
        await a.close()
        await b.close()

    run(main())


def test_thousand_concurrent_requests_share_one_connection() -> None:
    async def main() -> None:
        a, b = await pair()
        b.set_handler(echo)
        address = ("127.0.0.1", b.port)
        payloads = [bytes([i % 251]) * (100 + i) for i in range(1000)]
        responses = await asyncio.gather(
            *(
                a.request(b.peer_id, address, frame(ECHO, {"i": i}, p), timeout=30)
                for i, p in enumerate(payloads)
            )
        )
        for i, response in enumerate(responses):
            assert metadata_of(response) == {"i": i}
            assert bytes(response).endswith(payloads[i])
        stats = a.peer_stats(b.peer_id)
        assert stats is not None and stats.connections == 1 and stats.connected
        assert stats.messages_sent == 1000 and stats.messages_received == 1000
        assert stats.srtt_s > 0
        assert a.stats().connections == 1 and b.stats().connections == 1
        await a.close()
        await b.close()

    run(main())


def test_peer_id_mismatch_is_refused() -> None:
    async def main() -> None:
        a, b = await pair()
        b.set_handler(echo)
        wrong = hashlib.sha256(b"somebody else").digest()
        with pytest.raises(PeerIdMismatch, match="expected"):
            await a.request(wrong, ("127.0.0.1", b.port), frame(ECHO), timeout=10)
        assert a.peer_stats(wrong) is None
        # The endpoint is unharmed: the right peer id works at once.
        assert metadata_of(await a.request(b.peer_id, ("127.0.0.1", b.port), frame(ECHO, {"ok": 1}))) == {
            "ok": 1
        }
        await a.close()
        await b.close()

    run(main())


def test_unknown_alpn_is_refused() -> None:
    async def main() -> None:
        a, b = await pair(config_a=TransportConfig(alpn="someone-else/9"))
        b.set_handler(echo)
        with pytest.raises(HandshakeFailed, match="ALPN"):
            await a.request(b.peer_id, ("127.0.0.1", b.port), frame(ECHO), timeout=10)
        assert b.stats().handshakes_failed == 1
        await a.close()
        await b.close()

    run(main())


def test_ipv6_loopback_and_dual_stack() -> None:
    async def main() -> None:
        v6 = await Endpoint.start(new_key(), "::1", 0)
        dual = await Endpoint.start(new_key(), "::", 0)
        for ep in (v6, dual):
            ep.set_handler(echo)
        assert metadata_of(await v6.request(dual.peer_id, ("::1", dual.port), frame(ECHO, {"v": 6}))) == {
            "v": 6
        }
        client4 = await Endpoint.start(new_key(), "127.0.0.1", 0)
        # An IPv4 client reaches the dual-stack endpoint, which answers over IPv4-mapped addresses.
        assert metadata_of(
            await client4.request(dual.peer_id, ("127.0.0.1", dual.port), frame(ECHO, {"v": 4}))
        ) == {"v": 4}
        with pytest.raises(PeerUnreachable, match="IPv4-only"):
            await client4.request(v6.peer_id, ("::1", v6.port), frame(ECHO))
        for ep in (v6, dual, client4):
            await ep.close()

    run(main())


def test_request_without_address_uses_the_connection_the_peer_opened() -> None:
    async def main() -> None:
        client, worker = await pair()
        client.set_handler(lambda peer_id, buf: frame(ECHO, {"answered_by": "client"}))
        got: asyncio.Future[object] = asyncio.get_running_loop().create_future()

        async def on_message(peer_id: bytes, buffer: _core.Buffer) -> None:
            # A one-way message: answer the sender over its own connection (it may be behind NAT).
            got.set_result(await worker.request(peer_id, None, frame(ECHO), timeout=5))

        worker.set_handler(on_message)
        await client.send(worker.peer_id, ("127.0.0.1", worker.port), frame(ECHO, {"hello": 1}))
        assert metadata_of(await asyncio.wait_for(got, 10)) == {"answered_by": "client"}
        assert worker.stats().connections == 1  # no second connection was dialled
        with pytest.raises(PeerUnreachable, match="no address"):
            await worker.request(new_key()[:32], None, frame(ECHO))
        await client.close()
        await worker.close()

    run(main())


def test_handler_failure_and_missing_response_become_remote_errors() -> None:
    async def main() -> None:
        a, b = await pair()

        async def handler(peer_id: bytes, buffer: _core.Buffer) -> object:
            kind = metadata_of(buffer)["do"]
            if kind == "raise":
                raise RuntimeError("boom")
            if kind == "none":
                return None
            return b"not a frame at all, far too short"

        b.set_handler(handler)
        address = ("127.0.0.1", b.port)
        for what in ("raise", "none", "garbage"):
            with pytest.raises(RemoteError):
                await a.request(b.peer_id, address, frame(ECHO, {"do": what}), timeout=10)
        await a.close()
        await b.close()

    run(main())


def test_request_timeout_cancels_and_the_connection_stays_usable() -> None:
    async def main() -> None:
        a, b = await pair()

        async def handler(peer_id: bytes, buffer: _core.Buffer) -> object:
            await asyncio.sleep(metadata_of(buffer)["sleep"])
            return buffer

        b.set_handler(handler)
        address = ("127.0.0.1", b.port)
        start = time.monotonic()
        with pytest.raises(RequestTimeout):
            await a.request(b.peer_id, address, frame(ECHO, {"sleep": 5}), timeout=0.3)
        assert time.monotonic() - start < 2
        assert metadata_of(await a.request(b.peer_id, address, frame(ECHO, {"sleep": 0}))) == {"sleep": 0}
        stats = a.peer_stats(b.peer_id)
        assert stats is not None and stats.connections == 1
        await a.close()
        await b.close()

    run(main())


def test_oversized_frames_fail_on_either_side() -> None:
    async def main() -> None:
        small = TransportConfig(max_frame_size=1 << 20, max_pending_bytes=1 << 20)
        a, b = await pair(config_a=small)
        b.set_handler(echo)
        address = ("127.0.0.1", b.port)
        big = frame(ECHO, {}, bytes(2 << 20))
        with pytest.raises(FrameTooLarge, match="max_frame_size"):
            await a.request(b.peer_id, address, big)
        # The receiver's limit: b accepts 2 MiB, a refuses the 2 MiB echo coming back.
        with pytest.raises(FrameTooLarge):
            await b.request(a.peer_id, ("127.0.0.1", a.port), big, timeout=10)
        assert a.peer_stats(b.peer_id).frames_dropped == 1
        with pytest.raises(_core.FrameError):
            await a.request(b.peer_id, address, b"\x00" * 64)  # not a frame: refused before sending
        await a.close()
        await b.close()

    run(main())


def test_unreachable_address_fails_within_the_dead_peer_bound() -> None:
    async def main() -> None:
        a = await Endpoint.start(new_key(), "127.0.0.1", 0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
            silent.bind(("127.0.0.1", 0))
            start = time.monotonic()
            with pytest.raises(PeerUnreachable):
                await a.request(new_key(), ("127.0.0.1", silent.getsockname()[1]), frame(ECHO), timeout=10)
            assert time.monotonic() - start < 1.5
        await a.close()

    run(main())


def test_many_endpoints_in_one_process_all_talk_to_each_other() -> None:
    async def main() -> None:
        endpoints = [await Endpoint.start(new_key(), "127.0.0.1", 0) for _ in range(8)]
        for ep in endpoints:
            ep.set_handler(echo)
        calls = [
            src.request(dst.peer_id, ("127.0.0.1", dst.port), frame(ECHO, {"s": i, "d": j}), timeout=30)
            for i, src in enumerate(endpoints)
            for j, dst in enumerate(endpoints)
            if src is not dst
        ]
        results = await asyncio.gather(*calls)
        assert sorted((m["s"], m["d"]) for m in map(metadata_of, results)) == sorted(
            (i, j) for i in range(8) for j in range(8) if i != j
        )
        for ep in endpoints:
            await ep.close()

    run(main())


def test_close_fails_outstanding_requests() -> None:
    async def main() -> None:
        a, b = await pair()

        async def never(peer_id: bytes, buffer: _core.Buffer) -> object:
            await asyncio.sleep(60)
            return buffer

        b.set_handler(never)
        pending = asyncio.ensure_future(a.request(b.peer_id, ("127.0.0.1", b.port), frame(ECHO), timeout=30))
        await asyncio.sleep(0.2)
        await a.close()
        with pytest.raises(EndpointClosed):
            await pending
        await b.close()

    run(main())


def test_sent_tensors_stay_referenced_until_acknowledged_then_are_released() -> None:
    async def main() -> None:
        import gc
        import weakref

        a, b = await pair()
        b.set_handler(echo)
        tensor = torch.randn(256, 576)
        alive = weakref.ref(tensor)
        request = encode_message(1, 1, {}, [tensor])
        del tensor  # from here on only the frame (and the endpoint, until the peer acked it) holds it
        response = decode_message(await a.request(b.peer_id, ("127.0.0.1", b.port), request, timeout=10))
        assert response.tensors[0].shape == (256, 576)
        del request
        for _ in range(100):
            gc.collect()
            if alive() is None:
                break
            await asyncio.sleep(0.01)
        assert alive() is None
        await a.close()
        await b.close()

    run(main())


def test_a_frame_handed_to_the_transport_can_no_longer_be_renumbered() -> None:
    async def main() -> None:
        a, b = await pair()
        b.set_handler(echo)
        request = encode_message(1, 0, {}, [torch.randn(4, 8)])
        request.set_request_id(5)  # before sending: fine
        await a.request(b.peer_id, ("127.0.0.1", b.port), request, timeout=10)
        # QUIC may resend the frame's bytes until the peer acknowledged them: they must not change.
        with pytest.raises(ValueError, match="handed to the transport"):
            request.set_request_id(6)
        await a.close()
        await b.close()

    run(main())


def test_requests_beyond_the_peers_stream_limit_queue_until_credit_returns() -> None:
    async def main() -> None:
        a, b = await pair(config_b=TransportConfig(max_streams=16))

        async def slow_echo(peer_id: bytes, buffer: _core.Buffer) -> _core.Buffer:
            await asyncio.sleep(0.01)
            return buffer

        b.set_handler(slow_echo)
        address = ("127.0.0.1", b.port)
        results = await asyncio.gather(
            *(a.request(b.peer_id, address, frame(ECHO, {"i": i}), timeout=20) for i in range(200))
        )
        assert [metadata_of(r)["i"] for r in results] == list(range(200))
        assert b.peer_stats(a.peer_id).open_streams <= 16
        await a.close()
        await b.close()

    run(main())


def test_bad_start_arguments_raise_typed_errors() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="32-byte"):
            await Endpoint.start(b"short", "127.0.0.1", 0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            with pytest.raises(OSError, match="in use"):
                await Endpoint.start(new_key(), "127.0.0.1", taken.getsockname()[1])
        with pytest.raises(ValueError, match="max_pending_bytes"):
            await Endpoint.start(new_key(), "127.0.0.1", 0, TransportConfig(max_pending_bytes=1 << 20))

    run(main())


def test_one_way_messages_never_run_out_of_stream_credit() -> None:
    # More one-way messages on one connection than the peer grants streams at once (max_streams 1024):
    # every finished stream must hand its credit back (ngtcp2 < 0.14 never closed a peer's
    # unidirectional stream, which once stopped a connection after 1024 one-way messages).
    async def scenario() -> int:
        a, b = await pair()
        received = 0

        def count(peer_id: bytes, buffer: _core.Buffer) -> None:
            nonlocal received
            received += 1

        b.set_handler(count)
        message = frame(ECHO, {"n": 1})
        for _ in range(3000):
            await asyncio.wait_for(a.send(b.peer_id, ("127.0.0.1", b.port), message), 5)
        deadline = time.monotonic() + 5
        while received < 3000 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await a.close()
        await b.close()
        return received

    assert run(scenario()) == 3000


def test_the_receiver_answers_a_one_way_message_with_one_packet() -> None:
    """Its ACK, which also carries the reset of an earlier message's stream: before ngtcp2 0.14 one-way
    messages travel on bidirectional streams, and the receiver resets the side it never answers on.
    A reset sent on its own cost a packet and the sender's ACK of it, two wake-ups per message."""

    def compute(peer_id: bytes, buffer: _core.Buffer) -> None:
        time.sleep(0.002)  # a forward: longer than the ACK waits for an answer, so the ACK goes first

    async def scenario() -> int:
        a, b = await pair()
        b.set_handler(compute)
        address = ("127.0.0.1", b.port)
        await a.send(b.peer_id, address, frame(ECHO, {"n": 0}, bytes(2400)))  # connects
        await asyncio.sleep(0.1)
        before = b.stats().datagrams_sent
        for n in range(1, 21):
            await a.send(b.peer_id, address, frame(ECHO, {"n": n}, bytes(2400)))
            await asyncio.sleep(0.02)  # about a decode step's pace
        await asyncio.sleep(0.1)  # the last reset goes on its own after 25 ms
        sent = b.stats().datagrams_sent - before
        await a.close()
        await b.close()
        return sent

    assert run(scenario()) <= 25  # 20 messages: an ACK each, the last reset alone (40 before)


def test_send_soon_hands_every_frame_over_from_any_thread_and_reports_failures_through_its_future() -> None:
    async def scenario() -> tuple[list[int], BaseException | None]:
        a, b = await pair()
        received: list[int] = []
        b.set_handler(lambda peer_id, buffer: received.append(metadata_of(buffer)["n"]))

        def send(numbers: range) -> list[concurrent.futures.Future[None]]:
            return [a.send_soon(b.peer_id, ("127.0.0.1", b.port), frame(ECHO, {"n": n})) for n in numbers]

        # No await between the sends: each frame is handed to QUIC before send_soon returns, on the
        # loop's thread and on another one alike.
        sends = send(range(50)) + await asyncio.to_thread(send, range(50, 100))
        await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, sends)), 5)
        deadline = time.monotonic() + 5
        while len(received) < 100 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # A peer with no connection and no address: the future fails, send_soon itself does not raise.
        failed = asyncio.wrap_future(a.send_soon(new_key(), None, frame(ECHO)))
        error = await asyncio.wait_for(asyncio.gather(failed, return_exceptions=True), 5)
        await a.close()
        await b.close()
        return received, error[0]

    received, error = run(scenario())
    assert sorted(received) == list(range(100))
    assert isinstance(error, PeerUnreachable)


def test_send_or_report_hands_frames_over_and_calls_back_only_on_failure() -> None:
    async def scenario() -> tuple[list[int], list[BaseException]]:
        a, b = await pair()
        received: list[int] = []
        failures: list[BaseException] = []
        b.set_handler(lambda peer_id, buffer: received.append(metadata_of(buffer)["n"]))
        for n in range(20):
            a.send_or_report(b.peer_id, ("127.0.0.1", b.port), frame(ECHO, {"n": n}), failures.append)
        deadline = time.monotonic() + 5
        while len(received) < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # A peer with no connection and no address, then a closed endpoint: reported, not raised.
        a.send_or_report(new_key(), None, frame(ECHO), failures.append)
        while not failures and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await a.close()
        a.send_or_report(b.peer_id, ("127.0.0.1", b.port), frame(ECHO), failures.append)
        await b.close()
        return received, failures

    received, failures = run(scenario())
    assert sorted(received) == list(range(20))
    assert [type(error) for error in failures] == [PeerUnreachable, EndpointClosed]


def test_a_prepared_send_goes_once_with_the_request_id_given_after_it_was_prepared() -> None:
    async def scenario() -> tuple[list[tuple[int, int]], list[BaseException]]:
        a, b = await pair()
        received: list[tuple[int, int]] = []
        failures: list[BaseException] = []

        def handler(peer_id: bytes, buffer: _core.Buffer) -> None:
            received.append((_core.decode_frame(buffer).request_id, metadata_of(buffer)["n"]))

        b.set_handler(handler)
        frames = [frame(ECHO, {"n": n}) for n in range(3)]
        sends = [a.prepare_send(b.peer_id, ("127.0.0.1", b.port), f, failures.append) for f in frames]
        for n, f in enumerate(frames):
            f.set_request_id(100 + n)  # known only now, as a worker's step id is
        await asyncio.get_running_loop().run_in_executor(None, sends[1])  # from another thread too
        sends[0]()
        with pytest.raises(RuntimeError, match="sent already"):
            sends[0]()
        with pytest.raises(ValueError, match="handed to the transport"):
            frames[0].set_request_id(7)
        deadline = time.monotonic() + 5
        while len(received) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await a.close()
        sends[2]()  # after the close: reported, not raised
        await b.close()
        return received, failures

    received, failures = run(scenario())
    assert sorted(received) == [(100, 0), (101, 1)]  # the third was never sent; the first went once
    assert [type(error) for error in failures] == [EndpointClosed]


@pytest.mark.parametrize("host", ["127.0.0.1", "::"])  # "::": loopback as IPv4 mapped into IPv6
@pytest.mark.parametrize(("loopback_udp_payload", "datagrams"), [(16000, 1), (0, 2)])
def test_a_hidden_state_goes_to_a_loopback_peer_in_one_datagram(
    host: str, loopback_udp_payload: int, datagrams: int
) -> None:
    config = TransportConfig(loopback_udp_payload=loopback_udp_payload)
    hidden = torch.randn(1, 576)  # a token's hidden state in float32: 2304 bytes

    async def scenario() -> tuple[int, torch.Tensor]:
        a, b = await pair(config, config, host)
        arrived: asyncio.Queue[_core.Buffer] = asyncio.Queue()
        b.set_handler(lambda peer_id, buffer: arrived.put_nowait(buffer))
        address = ("127.0.0.1", b.port)
        await a.send(b.peer_id, address, frame(ECHO))  # connects
        await asyncio.wait_for(arrived.get(), 5)
        await asyncio.sleep(0.05)  # the handshake's and the first message's ACKs are done
        before = b.stats().datagrams_received
        await a.send(b.peer_id, address, encode_message(ECHO, 1, {}, [hidden]))
        buffer = await asyncio.wait_for(arrived.get(), 5)
        received = b.stats().datagrams_received - before
        await a.close()
        await b.close()
        return received, decode_message(buffer).tensors[0].clone()

    received, tensor = run(scenario())
    assert received == datagrams
    assert torch.equal(tensor, hidden)


def test_a_failing_failure_callback_does_not_keep_other_sends_from_reporting() -> None:
    async def scenario() -> list[int]:
        a, b = await pair()
        reported: list[int] = []

        def failing(error: BaseException) -> None:
            reported.append(0)
            raise RuntimeError("a buggy callback")

        # Two sends to a peer that cannot be reached: both fail in the same round of events.
        nobody = new_key()
        a.send_or_report(nobody, None, frame(ECHO), failing)
        a.send_or_report(nobody, None, frame(ECHO), lambda error: reported.append(1))
        deadline = time.monotonic() + 5
        while len(reported) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        before_close = list(reported)  # closing fails what is still pending: not what is tested
        await a.close()
        await b.close()
        return before_close

    assert sorted(run(scenario())) == [0, 1]


TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="busy-polling needs two CPUs")


@TWO_CPUS
def test_an_expected_message_is_taken_by_the_busy_poll_and_others_arrive_as_usual() -> None:
    async def scenario() -> tuple[list[tuple[int, bool]], tuple[int, int]]:
        a, b = await pair()
        address = ("127.0.0.1", b.port)
        received: list[tuple[int, bool]] = []  # (n, taken while busy-polling)

        def on_frame(peer_id: bytes, buffer: _core.Buffer) -> None:
            polling = any(frame.function == "_await_expected" for frame in inspect.stack())
            received.append((metadata_of(buffer)["n"], polling))

        async def until_received(count: int) -> None:
            deadline = time.monotonic() + 5
            while len(received) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.005)

        b.set_handler(on_frame)
        a.send_or_report(b.peer_id, address, frame(ECHO, {"n": 0}), pytest.fail)  # connects
        await until_received(1)
        loop = asyncio.get_running_loop()
        b.expect_message(loop.time() + 10, 0.05)  # replaced by the next: never waited for
        b.expect_message(loop.time() + 0.1, 0.05)
        # The loop's thread busy-polls from 50 to 150 ms: another thread sends meanwhile.
        sender = threading.Timer(
            0.1, a.send_or_report, (b.peer_id, address, frame(ECHO, {"n": 1}), pytest.fail)
        )
        sender.start()
        await until_received(2)
        sender.join()
        b.expect_message(loop.time() + 0.02, 0.01)  # nothing comes: the wait ends with its window
        await asyncio.sleep(0.1)
        a.send_or_report(b.peer_id, address, frame(ECHO, {"n": 2}), pytest.fail)
        await until_received(3)
        counts = (b.busy_polls, b.busy_polls_caught)
        await a.close()
        await b.close()
        return received, counts

    received, (polls, caught) = run(scenario())
    assert received == [(0, False), (1, True), (2, False)]
    assert (polls, caught) == (2, 1)


@TWO_CPUS
def test_a_process_confined_to_one_cpu_never_busy_polls() -> None:
    async def scenario() -> tuple[list[int], int]:
        allowed = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(allowed)})
        try:
            b = await Endpoint.start(new_key(), "127.0.0.1", 0)
        finally:
            os.sched_setaffinity(0, allowed)
        a = await Endpoint.start(new_key(), "127.0.0.1", 0)
        received: list[int] = []
        b.set_handler(lambda peer_id, buffer: received.append(metadata_of(buffer)["n"]))
        b.expect_message(asyncio.get_running_loop().time() + 0.02, 0.01)
        a.send_or_report(b.peer_id, ("127.0.0.1", b.port), frame(ECHO, {"n": 1}), pytest.fail)
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # past the window
        polls = b.busy_polls
        await a.close()
        await b.close()
        return received, polls

    assert run(scenario()) == ([1], 0)


def test_await_datagram_sleeps_then_spins_until_a_datagram_waits() -> None:
    async def scenario() -> None:
        endpoint = await Endpoint.start(new_key(), "127.0.0.1", 0)
        native = endpoint._native
        started = time.monotonic()
        assert not native.await_datagram(0.01, 0.01)  # nothing came: both phases ran out
        assert time.monotonic() - started >= 0.02
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"not quic", ("127.0.0.1", endpoint.port))
            assert native.await_datagram(5.0, 0.0)  # in the sleeping phase
            assert native.await_datagram(0.0, 5.0)  # in the spinning phase: still waiting
            assert native.receive() == []  # a stray datagram: read and dropped, no event
            assert not native.await_datagram(0.0, 0.001)
        await endpoint.close()

    run(scenario())
