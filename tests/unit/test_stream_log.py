"""The in-process stream log: what a reconnect gets, and what is kept how long."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from fabricai_trio.core.events import CompleteEvent, QueuedEvent, Timings, TokenEvent, Usage
from fabricai_trio.stream_log import MemoryStreamLog, NothingMissing, StreamNotFound

KEY = ("alice", "r1")


def complete(text: str = "ab") -> CompleteEvent:
    return CompleteEvent(
        request_id="r1", text=text, finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
        timings=Timings(queued_ms=0, ttft_ms=1, total_ms=2, tokens_per_second=None),
    )


async def read(log: MemoryStreamLog, after: int) -> list[int]:
    return [position async for position, _ in log.follow(KEY, after)]


async def test_replay_then_follow_until_the_final_event() -> None:
    log = MemoryStreamLog(ttl_seconds=60, max_events=100)
    log.append(KEY, 0, QueuedEvent(request_id="r1", position=0))
    log.append(KEY, 1, TokenEvent(request_id="r1", index=0, text="a"))
    got: list[int] = []

    async def reader() -> None:
        async for position, _ in log.follow(KEY, 0):
            got.append(position)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [1]  # replayed; the reader now waits for more
        log.append(KEY, 2, TokenEvent(request_id="r1", index=1, text="b"))
        log.append(KEY, 3, complete())
    assert got == [1, 2, 3]
    with pytest.raises(NothingMissing):
        await log.check(KEY, 3)
    with pytest.raises(StreamNotFound):
        await log.check(("mallory", "r1"), 0)


async def test_ended_streams_expire_after_the_ttl_and_beyond_the_cap() -> None:
    now = [0.0]
    log = MemoryStreamLog(ttl_seconds=10, max_events=100, max_ended=2, clock=lambda: now[0])
    for owner in ("a", "b"):
        log.append((owner, "r1"), 1, complete())
    await log.check(("a", "r1"), 0)  # kept
    log.append(("c", "r1"), 1, complete())  # a third ended stream: the oldest goes
    with pytest.raises(StreamNotFound):
        await log.check(("a", "r1"), 0)
    await log.check(("b", "r1"), 0)
    now[0] = 11.0
    with pytest.raises(StreamNotFound):
        await log.check(("b", "r1"), 0)


async def test_a_running_stream_keeps_its_last_events_only() -> None:
    log = MemoryStreamLog(ttl_seconds=10, max_events=3)
    for index in range(5):
        log.append(KEY, index + 1, TokenEvent(request_id="r1", index=index, text="x"))
    log.append(KEY, 6, complete())
    assert await read(log, -1) == [4, 5, 6]  # bounded: the oldest were dropped
