"""The generation path under cancellation at every checkpoint (fake engine, MockClock).

For each k, a generation is cancelled at the k-th time its task reaches a checkpoint
(an instrument cancels the scope just before that task step runs). Whatever k is,
afterwards: no slot or queue place is held, the engine is idle, the session lock is
free, and the session holds the turn at most once (and, if generation started, with
finish_reason `cancelled`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from trio.lowlevel import Task

from fabricai_trio.admission import Admission
from fabricai_trio.core.errors import DomainError
from fabricai_trio.core.events import CompleteEvent, TokenEvent
from fabricai_trio.core.requests import GenerationRequest
from fabricai_trio.generation import Generation, GenerationService, Keepalive
from fabricai_trio.sessions import MemorySessionStore
from fabricai_trio.settings import Settings

from ..fakes import FakeEngine


@dataclass
class Harness:
    service: GenerationService
    engine: FakeEngine
    store: MemorySessionStore
    admission: Admission


@asynccontextmanager
async def harness(**overrides: object) -> AsyncIterator[Harness]:
    settings = Settings(
        max_concurrent_requests=1, max_queue_size=2, sse_keepalive_seconds=0.05,
        store_timeout_seconds=1.0, **overrides,  # type: ignore[arg-type]
    )
    async with running_service(settings) as h:
        yield h


@asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[Harness]:
    """A generation service on the fake engine, a memory store and an admission sized
    from `settings`, running until the block ends."""
    engine = FakeEngine(settings)
    await engine.load()
    store = MemorySessionStore(clock=trio.current_time)
    admission = Admission(max_concurrent=settings.max_concurrent_requests,
                          max_queue=settings.max_queue_size)
    service = GenerationService(settings=settings, engine=engine, admission=admission,
                                store=store)
    service.ready = True
    async with trio.open_nursery() as nursery:
        await nursery.start(admission.run)
        await nursery.start(service.run)
        yield Harness(service, engine, store, admission)
        nursery.cancel_scope.cancel()


class CancelAtStep(trio.abc.Instrument):
    """A trio instrument: cancel `scope` just before `task`'s k-th step."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.steps = 0
        self.task: Task | None = None
        self.scope: trio.CancelScope | None = None

    def before_task_step(self, task: Task) -> None:
        if task is not self.task or self.scope is None:
            return
        self.steps += 1
        if self.steps == self.k:
            self.scope.cancel()


async def run_generation(h: Harness, request: GenerationRequest, probe: CancelAtStep) -> None:
    probe.task = trio.lowlevel.current_task()
    with trio.CancelScope() as scope:
        probe.scope = scope
        generation = await h.service.prepare(request, owner="alice")
        try:
            async with aclosing(generation.events()) as events:
                async for _ in events:
                    pass
        finally:
            with trio.CancelScope(shield=True):
                await generation.close()
    probe.scope = None


async def count_steps(request: GenerationRequest) -> int:
    async with harness() as h:
        session = await h.store.create("alice", session_id="s1")
        assert session
        probe = CancelAtStep(10**9)
        trio.lowlevel.add_instrument(probe)
        try:
            await run_generation(h, request, probe)
        finally:
            trio.lowlevel.remove_instrument(probe)
        return probe.steps


def make_request(request_id: str = "r1") -> GenerationRequest:
    return GenerationRequest(prompt="hello there", session_id="s1", max_tokens=4,
                             request_id=request_id)


async def test_cancel_at_every_checkpoint_leaks_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    total = await count_steps(make_request())
    assert total > 8
    for k in range(1, total + 1):
        async with harness() as h:
            await h.store.create("alice", session_id="s1")
            probe = CancelAtStep(k)
            trio.lowlevel.add_instrument(probe)
            try:
                with suppress(DomainError):
                    await run_generation(h, make_request(), probe)
            finally:
                trio.lowlevel.remove_instrument(probe)
            await trio.testing.wait_all_tasks_blocked()
            stats = h.admission.stats()
            assert (stats.active, stats.queued) == (0, 0), k
            assert h.engine.in_use == 0, k
            assert await h.store.try_lock("s1", "probe", 5.0), k
            session = await h.store.get("s1")
            assert session is not None
            assert len(session.messages) in (0, 2), k
            if session.messages:
                assistant = session.messages[-1]
                assert assistant.role == "assistant"
                if assistant.finish_reason != "length":
                    assert assistant.finish_reason == "cancelled", k
                    assert len(assistant.content.split()) < 4


async def test_complete_run_stores_the_turn(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        await h.store.create("alice", session_id="s1")
        generation = await h.service.prepare(make_request(), owner="alice")
        async with aclosing(generation.events()) as events:
            seen = [e async for e in events]
        assert isinstance(seen[-1], CompleteEvent)
        tokens = [e for e in seen if isinstance(e, TokenEvent)]
        assert "".join(t.text for t in tokens) == seen[-1].text
        session = await h.store.get("s1")
        assert session is not None
        assert [m.role for m in session.messages] == ["user", "assistant"]
        assert session.messages[1].finish_reason == "length"
        assert session.messages[1].content == seen[-1].text


async def test_second_turn_on_a_busy_session_is_409(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        await h.store.create("alice", session_id="s1")
        first = await h.service.prepare(make_request(), owner="alice")
        with pytest.raises(DomainError) as info:
            await h.service.prepare(make_request("r2"), owner="alice")
        assert info.value.status_hint == 409 and info.value.code == "session_busy"
        with pytest.raises(DomainError) as info:  # the same id while the first runs
            await h.service.prepare(make_request(), owner="alice")
        assert info.value.code == "duplicate_request_id"
        await first.close()
        second = await h.service.prepare(make_request(), owner="alice")
        await second.close()


async def test_a_full_queue_refuses_before_the_session_and_the_tokenizer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        held = [await h.service.prepare(GenerationRequest(prompt="x"), owner="a")
                for _ in range(3)]
        await h.store.create("alice", session_id="s1")
        tokenized: list[str] = []
        tokenize = h.engine.tokenize

        async def counting(
            text: str, *, add_bos: bool = True, limit: int | None = None
        ) -> list[int]:
            tokenized.append(text)
            return await tokenize(text, add_bos=add_bos, limit=limit)

        h.engine.tokenize = counting  # type: ignore[method-assign]
        h.engine.tokenize_chat = None  # type: ignore[assignment,method-assign]
        with pytest.raises(DomainError) as info:
            await h.service.prepare(make_request(), owner="alice")
        assert info.value.status_hint == 429
        assert tokenized == []  # refused first: no tokenization, no store round trip
        assert await h.store.try_lock("s1", "probe", 5.0)  # the lock was never taken
        for g in held:
            await g.close()


async def test_other_owner_and_unknown_are_the_same_404(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        await h.store.create("alice", session_id="s1")
        with pytest.raises(DomainError) as theirs:
            await h.service.prepare(make_request(), owner="mallory")
        with pytest.raises(DomainError) as unknown:
            await h.service.prepare(
                GenerationRequest(prompt="x", session_id="nope"), owner="alice"
            )
        assert theirs.value.status_hint == unknown.value.status_hint == 404
        assert repr(theirs.value) == repr(unknown.value)


async def test_keepalives_while_queued(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        running = await h.service.prepare(
            GenerationRequest(prompt="x", max_tokens=50), owner="a"
        )
        waiting = await h.service.prepare(GenerationRequest(prompt="y", max_tokens=1), owner="a")
        seen: list[object] = []

        async def drive(generation: Generation, sink: list[object]) -> None:
            async with aclosing(generation.events()) as events:
                async for event in events:
                    sink.append(event)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drive, running, [])
            nursery.start_soon(drive, waiting, seen)
        keepalives = sum(isinstance(e, Keepalive) for e in seen)
        # 50 tokens at 10 ms while waiting, a keepalive every 50 ms: about 10.
        assert 8 <= keepalives <= 11
        assert isinstance(seen[-1], CompleteEvent)
