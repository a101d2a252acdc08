"""The outbox between a generation and its client, deterministically (MockClock, fake
engine): a client that stops reading loses its generation after the timeout, with the
cause `slow_client`, and the turn is stored; one that reads keeps it."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from unittest.mock import patch

import trio
import trio.testing

from fabricai_trio.core.engine import Chunk, EngineRequest
from fabricai_trio.core.events import CompleteEvent
from fabricai_trio.core.requests import GenerationRequest
from fabricai_trio.generation import Generation
from fabricai_trio.outbox import Outbox, pump

from .test_generation_cancel import Harness, harness


async def test_frames_count_until_written_and_a_full_outbox_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outbox = Outbox[bytes](max_bytes=10, timeout=5.0)
    assert await outbox.put(b"12345678", 8)
    assert await outbox.get() == b"12345678"
    assert outbox.buffered_bytes == 8  # taken, not written
    with trio.move_on_after(1.0) as waited:
        await outbox.put(b"abc", 3)
    assert waited.cancelled_caught  # full until the first frame is written
    outbox.written()
    assert outbox.buffered_bytes == 0
    assert await outbox.put(b"abc", 3)


async def test_the_oldest_unwritten_frame_makes_the_client_slow_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outbox = Outbox[bytes](max_bytes=1000, timeout=5.0)
    start = trio.current_time()
    await outbox.put(b"x", 1)
    await trio.sleep(4.0)
    assert not outbox.overdue()
    await outbox.wait_overdue()
    assert trio.current_time() - start == 5.0
    outbox.mark_slow()
    assert not await outbox.put(b"dropped", 7)
    assert await outbox.put(b"final", 5, force=True)


async def source(frames: list[bytes]) -> AsyncGenerator[bytes, None]:
    for frame in frames:
        await trio.sleep(0.1)
        yield frame


async def test_pump_forces_the_last_frames_in_once_finished(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outbox = Outbox[bytes](max_bytes=4, timeout=1.0)
    slow: list[bool] = []
    done = False

    async def frames() -> AsyncGenerator[bytes, None]:
        nonlocal done
        for _ in range(50):
            await trio.sleep(0.1)
            yield b"tok"
        done = True
        yield b"complete"

    await pump(frames(), outbox, on_slow=lambda: slow.append(True), finished=lambda: done)
    assert slow == [True]
    got = [frame async for frame in outbox.frames()]
    assert got[0] == b"tok" and got[-1] == b"complete" and len(got) < 10


async def test_a_client_that_stops_reading_loses_its_generation_as_slow_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(max_tokens_limit=2048) as h:
        await h.store.create("alice", session_id="s1")
        request = GenerationRequest(prompt="hello there", session_id="s1", max_tokens=1000,
                                    request_id="r1")
        generation = await h.service.prepare(request, owner="alice")
        outbox = Outbox[bytes](max_bytes=256, timeout=3.0)

        async def framed(g: Generation) -> AsyncGenerator[bytes, None]:
            async for event in g.events():
                yield repr(event).encode()

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: pump(
                framed(generation), outbox, on_slow=lambda: generation.cancel("slow_client"),
                finished=lambda: generation.finish_reason is not None,
            ))
            assert await outbox.get() is not None  # taken, never written: the reader stops
        assert generation.finish_reason == "cancelled"
        assert generation.cancel_cause == "slow_client"
        assert 3.0 <= trio.current_time() - started < 4.0
        assert generation.completion_tokens < 1000
        assert h.admission.stats().active == 0 and h.service.live_count == 0
        session = await h.store.get("s1")
        assert session is not None
        assert [m.finish_reason for m in session.messages] == [None, "cancelled"]


async def test_an_engine_that_raises_ends_the_generation_with_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def broken(request: EngineRequest) -> AsyncGenerator[Chunk, None]:
        await trio.sleep(0.1)
        if request.max_tokens:
            raise RuntimeError("boom")
        yield Chunk("never", 1)

    async with harness() as h:
        with patch.object(h.engine, "generate_stream", broken):
            await run_broken(h)


async def run_broken(h: Harness) -> None:
    await h.store.create("alice", session_id="s1")
    request = GenerationRequest(prompt="hi", session_id="s1", max_tokens=4, request_id="r1")
    generation = await h.service.prepare(request, owner="alice")
    events = [event async for event in generation.events()]
    assert not any(isinstance(e, CompleteEvent) for e in events)
    assert generation.finish_reason == "error" and generation.cancel_cause is None
    assert events[-1].code == "engine_error"  # type: ignore[union-attr]
    session = await h.store.get("s1")
    assert session is not None and session.messages[-1].finish_reason == "error"


async def test_a_cancel_is_not_held_up_by_a_client_that_stopped_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(max_tokens_limit=2048) as h:
        await h.store.create("alice", session_id="s1")
        request = GenerationRequest(prompt="hello there", session_id="s1", max_tokens=1000,
                                    request_id="r1")
        generation = await h.service.prepare(request, owner="alice")
        outbox = Outbox[bytes](max_bytes=256, timeout=600.0)  # never slow in this test
        generation.on_cancel = outbox.release

        async def framed(g: Generation) -> AsyncGenerator[bytes, None]:
            async for event in g.events():
                yield repr(event).encode()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: pump(
                framed(generation), outbox, on_slow=lambda: None,
                finished=lambda: generation.finish_reason is not None,
            ))
            assert await outbox.get() is not None  # taken, never written
            await trio.sleep(5.0)  # the outbox is full: the generation waits
            assert generation.finish_reason is None
            started = trio.current_time()
            assert await h.service.cancel("alice", "r1", "shutdown")
        assert trio.current_time() - started < 1.0  # ended at once, not after 600 s
        ended = generation.complete_event()
        assert (ended.finish_reason, ended.cancel_cause) == ("cancelled", "shutdown")
        assert h.admission.stats().active == 0 and h.service.live_count == 0
