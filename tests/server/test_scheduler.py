"""The worker's compute loop on a real span (SmolLM2 blocks 1-2): where work runs, how decodes batch,
and that results are the span's whatever path they take."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from inferencemesh.compute.errors import CacheOverflow
from inferencemesh.compute.kv_cache import KVCacheManager, SessionCache
from inferencemesh.compute.span import Span
from inferencemesh.server import scheduler as scheduler_module
from inferencemesh.server.scheduler import Burst, ComputeScheduler

HIDDEN = 576


@pytest.fixture(scope="module")
def span(smollm2_dir: Path) -> Span:
    return Span.load(smollm2_dir, 0, 2, progress=False)


@pytest.fixture
def caches(span: Span) -> Iterator[KVCacheManager]:
    yield span.cache_manager(64 << 20)


def scheduler(
    span: Span,
    *,
    inline_budget_s: float = 1.0,
    gather_s: float = 0.0,
    decode_row_s: float = 0.001,
    prefill_token_s: float = 0.001,
    busy: Callable[[bool], None] | None = None,
) -> ComputeScheduler:
    return ComputeScheduler(
        span,
        max_batch=8,
        prefill_chunk=4,
        inline_budget_s=inline_budget_s,
        gather_s=gather_s,
        decode_row_s=decode_row_s,
        prefill_token_s=prefill_token_s,
        busy=busy,
    )


async def compute(
    sched: ComputeScheduler,
    cache: SessionCache,
    hidden: torch.Tensor,
    burst: Burst | None = None,
    out: torch.Tensor | None = None,
    written: Callable[[], None] | None = None,
) -> torch.Tensor:
    done: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()

    def settle(output: torch.Tensor | None, error: BaseException | None) -> None:
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(output)

    sched.submit(cache, hidden, settle, burst, out, written=written)
    return await done


async def prefilled_sessions(
    sched: ComputeScheduler, caches: KVCacheManager, count: int
) -> list[SessionCache]:
    """``count`` sessions with a 2-token prompt each, computed by ``sched``."""
    sessions = [caches.allocate(i, 32) for i in range(count)]
    for cache in sessions:
        await compute(sched, cache, torch.zeros(2, HIDDEN))
    return sessions


async def gathering_with_two_sessions(
    span: Span, caches: KVCacheManager
) -> tuple[ComputeScheduler, list[SessionCache]]:
    """A scheduler that would hold loose steps up to 5 s for others to join them, and two sessions it
    has just prefilled (so both count as active)."""
    sched = scheduler(span, gather_s=5.0)
    return sched, await prefilled_sessions(sched, caches, 2)


def reference(span: Span, caches: KVCacheManager, prompt: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    cache = caches.allocate("reference", 32)
    span.prefill(prompt, cache)
    output = span.decode(step, [cache])
    caches.free("reference")
    return output


def assert_each_is_the_span_output(
    span: Span,
    caches: KVCacheManager,
    prompts: list[torch.Tensor],
    steps: torch.Tensor,
    outputs: list[torch.Tensor],
) -> None:
    """outputs[i] is the decode of steps[i] after prompts[i], as the span computes it alone."""
    for i, output in enumerate(outputs):
        expected = reference(span, caches, prompts[i], steps[i : i + 1])
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("inline_budget_s", [1.0, 0.0], ids=["inline", "compute-thread"])
def test_prefill_and_decode_give_the_span_output_inline_or_on_the_thread(
    span: Span, caches: KVCacheManager, inline_budget_s: float
) -> None:
    torch.manual_seed(0)
    prompt, step = torch.randn(10, HIDDEN), torch.randn(1, HIDDEN)

    async def run() -> tuple[torch.Tensor, ComputeScheduler]:
        sched = scheduler(span, inline_budget_s=inline_budget_s)
        cache = caches.allocate("session", 32)
        # 10 tokens with 4-token chunks on the thread: three chunks whose outputs are joined.
        prefilled = await compute(sched, cache, prompt)
        assert prefilled.shape == (10, HIDDEN)
        return await compute(sched, cache, step), sched

    output, sched = asyncio.run(run())
    sched.stop()
    torch.testing.assert_close(output, reference(span, caches, prompt, step), rtol=1e-5, atol=1e-4)
    assert sched.stats.prefill_tokens == 10 and sched.stats.decode_tokens == 1
    assert (sched.stats.inline_jobs > 0) == (inline_budget_s > 0)


def test_long_inline_work_lends_the_socket_and_short_work_keeps_it(
    span: Span, caches: KVCacheManager
) -> None:
    calls: list[bool] = []

    async def run() -> ComputeScheduler:
        sched = scheduler(span, prefill_token_s=0.005, busy=calls.append)
        cache = caches.allocate("session", 32)
        await compute(sched, cache, torch.zeros(4, HIDDEN))  # expected to take 4 x 5 ms: lends
        assert calls == [True, False]
        await compute(sched, cache, torch.zeros(1, HIDDEN))  # a decode expected to take 1 ms: keeps it
        return sched

    sched = asyncio.run(run())
    sched.stop()
    assert calls == [True, False]
    assert sched.stats.inline_jobs == 2


def test_decodes_submitted_in_one_loop_turn_run_as_one_batch(span: Span, caches: KVCacheManager) -> None:
    torch.manual_seed(1)
    prompts = [torch.randn(3 + i, HIDDEN) for i in range(3)]
    steps = torch.randn(3, HIDDEN)

    async def run() -> tuple[list[torch.Tensor], ComputeScheduler]:
        sched = scheduler(span)
        sessions = [caches.allocate(i, 32) for i in range(3)]
        for cache, prompt in zip(sessions, prompts, strict=True):
            await compute(sched, cache, prompt)
        outputs = await asyncio.gather(
            *(compute(sched, cache, steps[i : i + 1]) for i, cache in enumerate(sessions))
        )
        return outputs, sched

    outputs, sched = asyncio.run(run())
    sched.stop()
    assert sched.stats.decode_batches == 1 and sched.stats.decode_tokens == 3
    assert_each_is_the_span_output(span, caches, prompts, steps, outputs)


def test_a_decode_alone_writes_into_its_output_tensor_and_one_in_a_batch_gets_its_row(
    span: Span, caches: KVCacheManager
) -> None:
    torch.manual_seed(2)
    prompts = [torch.randn(3, HIDDEN), torch.randn(4, HIDDEN)]
    steps = torch.randn(2, HIDDEN)
    outs = [torch.full((1, HIDDEN), float("nan")) for _ in steps]
    # When ``written`` runs (a worker sends the output from there): whether the output was in place.
    written: list[tuple[int, bool]] = []

    async def run() -> list[torch.Tensor]:
        sched = scheduler(span)
        sessions = [caches.allocate(i, 32) for i in range(2)]
        for cache, prompt in zip(sessions, prompts, strict=True):
            await compute(sched, cache, prompt)
        alone = await compute(
            sched,
            sessions[0],
            steps[0:1],
            out=outs[0],
            written=lambda: written.append((0, not outs[0].isnan().any())),
        )
        together = await asyncio.gather(
            compute(sched, sessions[1], steps[1:2], out=outs[1], written=lambda: written.append((1, True))),
            compute(sched, sessions[0], steps[0:1]),  # makes it a batch of two
        )
        sched.stop()
        assert all(cache.last_decode_s > 0 for cache in sessions)
        return [alone, together[0]]

    alone, batched = asyncio.run(run())
    assert alone is outs[0]  # computed into it, no copy
    assert written == [(0, True)]  # once the output was in place; not for a step computed in a batch
    assert batched is not outs[1] and outs[1].isnan().all()  # a batch's rows stay in its output
    reference = caches.allocate("reference", 32)
    span.prefill(prompts[0], reference)
    torch.testing.assert_close(alone, span.decode(steps[0:1], [reference]), rtol=0, atol=0)


def test_a_batch_waits_for_active_sessions_but_no_longer_than_one_batch_takes(
    span: Span, caches: KVCacheManager
) -> None:
    async def run() -> float:
        sched, sessions = await gathering_with_two_sessions(span, caches)
        step = torch.zeros(1, HIDDEN)
        # Both sessions decode once, in separate batches (nothing else is active yet).
        await compute(sched, sessions[0], step)
        await compute(sched, sessions[1], step)
        assert sched.stats.decode_batches == 2
        # Now both are active: a step arriving a loop turn after the first joins its batch.
        first = asyncio.ensure_future(compute(sched, sessions[0], step))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not first.done()
        await asyncio.gather(first, compute(sched, sessions[1], step))
        assert sched.stats.decode_batches == 3
        # A step that nobody joins waits at most about one batch's compute, not the 5 s quiet gap.
        loop = asyncio.get_running_loop()
        started = loop.time()
        await compute(sched, sessions[0], step)
        assert sched.stats.decode_batches == 4
        sched.stop()
        return loop.time() - started

    assert asyncio.run(run()) < 5.0


def test_a_burst_runs_as_one_batch_when_complete_and_other_bursts_do_not_hold_it(
    span: Span, caches: KVCacheManager
) -> None:
    torch.manual_seed(2)
    prompts = [torch.randn(2, HIDDEN) for _ in range(4)]
    steps = torch.randn(4, HIDDEN)
    first, second = Burst(("client", 1), 2), Burst(("client", 2), 2)

    async def run() -> list[torch.Tensor]:
        # Loose steps would wait for each other up to 5 s, a burst's for ~1 s (one batch's time).
        sched = scheduler(span, gather_s=5.0, decode_row_s=1.0)
        sessions = [caches.allocate(i, 32) for i in range(4)]
        for cache, prompt in zip(sessions, prompts, strict=True):
            await compute(sched, cache, prompt)
        bursts = [first, first, second, second]

        def submit(i: int) -> asyncio.Future[torch.Tensor]:
            return asyncio.ensure_future(compute(sched, sessions[i], steps[i : i + 1], bursts[i]))

        # The client keeps two bursts in flight: the first completes while the second is still
        # arriving, and runs at once without it.
        outputs = {i: submit(i) for i in (0, 2, 1)}
        await asyncio.gather(outputs[0], outputs[1])
        assert not outputs[2].done()
        assert (sched.stats.decode_batches, sched.stats.decode_tokens) == (1, 2)
        outputs[3] = submit(3)
        await asyncio.gather(outputs[2], outputs[3])
        assert (sched.stats.decode_batches, sched.stats.decode_tokens) == (2, 4)
        sched.stop()
        return [outputs[i].result() for i in range(4)]

    outputs = asyncio.run(run())
    assert_each_is_the_span_output(span, caches, prompts, steps, outputs)


def test_a_burst_missing_a_step_runs_without_it_after_one_batch_time(
    span: Span, caches: KVCacheManager
) -> None:
    async def run() -> float:
        sched, sessions = await gathering_with_two_sessions(span, caches)
        burst = Burst(("client", 7), 3)  # the third step never comes (failed upstream)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(compute(sched, cache, torch.zeros(1, HIDDEN), burst) for cache in sessions))
        assert (sched.stats.decode_batches, sched.stats.decode_tokens) == (1, 2)
        sched.stop()
        return loop.time() - started

    assert asyncio.run(run()) < 5.0


def test_a_lone_session_never_waits(span: Span, caches: KVCacheManager) -> None:
    async def run() -> float:
        sched = scheduler(span, gather_s=5.0)
        cache = caches.allocate("alone", 32)
        await compute(sched, cache, torch.zeros(2, HIDDEN))
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(3):
            await compute(sched, cache, torch.zeros(1, HIDDEN))
        sched.stop()
        return loop.time() - started

    assert asyncio.run(run()) < 5.0  # a wait would take the whole gap


def test_a_lone_sessions_decodes_are_booked_and_keep_it_active_for_others(
    span: Span, caches: KVCacheManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone session's decodes run at once, and count like any: in the stats, in its cache's last
    decode time, and as the activity that makes a second session's step wait for it to join."""
    monkeypatch.setattr(scheduler_module, "ACTIVE_S", 0.05)

    async def run() -> tuple[tuple[int, int, bool], bool, tuple[int, int]]:
        sched = scheduler(span, gather_s=5.0)
        lone = caches.allocate("lone", 32)
        await compute(sched, lone, torch.zeros(2, HIDDEN))
        await asyncio.sleep(0.1)  # its prefill no longer counts as activity: only its decodes do
        for _ in range(3):
            await compute(sched, lone, torch.zeros(1, HIDDEN))
        booked = (sched.stats.decode_tokens, sched.stats.decode_batches, lone.last_decode_s > 0)
        other = caches.allocate("other", 32)
        await compute(sched, other, torch.zeros(2, HIDDEN))
        step = asyncio.ensure_future(compute(sched, other, torch.zeros(1, HIDDEN)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        waited = not step.done()
        await asyncio.gather(step, compute(sched, lone, torch.zeros(1, HIDDEN)))
        sched.stop()
        return booked, waited, (sched.stats.decode_tokens, sched.stats.decode_batches)

    booked, waited, after = asyncio.run(run())
    assert booked == (3, 3, True)
    assert waited  # for the lone session's next step, which then joined it
    assert after == (5, 4)


@pytest.mark.parametrize("closed", [False, True], ids=["open", "closed"])
def test_a_closed_session_is_not_waited_for(span: Span, caches: KVCacheManager, closed: bool) -> None:
    async def run() -> bool:
        sched, sessions = await gathering_with_two_sessions(span, caches)
        if closed:
            caches.free(1)  # as closing a session, expiring it or shutting down does
        step = asyncio.ensure_future(compute(sched, sessions[0], torch.zeros(1, HIDDEN)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        ran_at_once = step.done()
        await step
        sched.stop()
        return ran_at_once

    # An open session's next step is expected, so the step waits for it; a closed one's never comes.
    assert asyncio.run(run()) is closed


def test_a_failing_job_reports_its_error_and_the_loop_goes_on(span: Span, caches: KVCacheManager) -> None:
    async def run() -> ComputeScheduler:
        sched = scheduler(span, inline_budget_s=0.0)
        cache = caches.allocate("session", 4)
        with pytest.raises(CacheOverflow):
            await compute(sched, cache, torch.zeros(6, HIDDEN))  # longer than the cache
        output = await compute(sched, cache, torch.zeros(2, HIDDEN))
        assert output.shape == (2, HIDDEN)
        return sched

    asyncio.run(run()).stop()


def test_inline_work_counts_against_the_budget_of_its_loop_turn_and_the_next_turn_starts_over(
    span: Span, caches: KVCacheManager
) -> None:
    torch.manual_seed(5)
    prompt = torch.randn(2, HIDDEN)

    async def run() -> tuple[torch.Tensor, list[float], int]:
        sched = scheduler(span)
        cache = caches.allocate("session", 32)
        done: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        sched.submit(cache, prompt, lambda output, error: done.set_result(output))  # inline, now
        spent = [sched._inline_spent]  # this turn's
        await asyncio.sleep(0)  # the next loop turn
        spent.append(sched._inline_spent)
        sched.stop()
        return await done, spent, sched.stats.inline_jobs

    output, spent, inline_jobs = asyncio.run(run())
    assert inline_jobs == 1 and spent[0] > 0 and spent[1] == 0
    reference = caches.allocate("reference", 32)
    torch.testing.assert_close(output, span.prefill(prompt, reference), rtol=1e-5, atol=1e-4)
