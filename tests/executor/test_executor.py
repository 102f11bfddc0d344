"""How the executor batches a job's events for the store (its Redis side is tested with real
executor processes in tests/service)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from cellblock.executor import executor
from cellblock.executor.executor import next_batch
from cellblock.service.protocol import (
    Event,
    FinishedEvent,
    OutputEvent,
    SandboxResult,
    StageFinishedEvent,
    StageStartedEvent,
    TestFinishedEvent,
    TestResult,
    TestStartedEvent,
)

Pending = asyncio.Queue[Event | None]
OUTPUT = OutputEvent(stage="run", stream="stdout", data="hi\n")
STARTED = StageStartedEvent(stage="run")
ENDED = StageFinishedEvent(stage="run", result=SandboxResult(status="ok"))


def kinds(batch: list[Event]) -> list[str]:
    return [event.type for event in batch]


async def test_what_has_queued_up_goes_together_up_to_the_end_marker() -> None:
    pending: Pending = asyncio.Queue()
    for body in (STARTED, OUTPUT, ENDED, FinishedEvent(), None):
        pending.put_nowait(body)
    batch, ended = await next_batch(pending)
    assert kinds(batch) == ["stage_started", "output", "stage_finished", "finished"] and ended


async def test_what_the_same_turn_adds_joins_the_batch() -> None:
    pending: Pending = asyncio.Queue()

    async def job_end() -> None:
        pending.put_nowait(ENDED)
        await asyncio.sleep(0)  # as the executor's job task does before it adds finished
        pending.put_nowait(FinishedEvent())

    task = asyncio.create_task(job_end())
    batch, ended = await next_batch(pending)
    assert kinds(batch) == ["stage_finished", "finished"] and not ended
    await task


async def test_output_waits_a_moment_for_the_end_of_its_stage() -> None:
    pending: Pending = asyncio.Queue()
    loop = asyncio.get_running_loop()
    pending.put_nowait(OUTPUT)
    loop.call_later(executor.OUTPUT_LINGER / 2, pending.put_nowait, ENDED)
    batch, _ = await next_batch(pending)
    assert kinds(batch) == ["output", "stage_finished"]


async def test_output_goes_alone_when_nothing_follows_in_time() -> None:
    pending: Pending = asyncio.Queue()
    pending.put_nowait(OUTPUT)
    started = time.monotonic()
    batch, ended = await next_batch(pending)
    waited = time.monotonic() - started
    assert kinds(batch) == ["output"] and not ended
    assert executor.OUTPUT_LINGER * 0.9 <= waited < executor.OUTPUT_LINGER + 0.2
    pending.put_nowait(None)
    assert await next_batch(pending) == ([], True)


async def test_a_steady_stream_of_output_still_goes_out_every_linger() -> None:
    pending: Pending = asyncio.Queue()

    async def chatty() -> None:
        for _ in range(100):
            pending.put_nowait(OUTPUT)
            await asyncio.sleep(executor.OUTPUT_LINGER / 10)

    task = asyncio.create_task(chatty())
    started = time.monotonic()
    batch, _ = await next_batch(pending)
    assert time.monotonic() - started < executor.OUTPUT_LINGER + 0.2
    assert 1 < len(batch) < 100
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_test_s_end_waits_a_moment_for_the_next_test() -> None:
    """Short tests go a few at a time: each batch rewrites the stored document."""
    pending: Pending = asyncio.Queue()
    loop = asyncio.get_running_loop()
    result = TestResult(status="ok", name="a", verdict="passed")
    pending.put_nowait(TestFinishedEvent(test=0, result=result))
    loop.call_later(
        executor.OUTPUT_LINGER / 2, pending.put_nowait, TestStartedEvent(test=1, name="b")
    )
    batch, _ = await next_batch(pending)
    assert kinds(batch) == ["test_finished", "test_started"]
