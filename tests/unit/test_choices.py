"""A request for n choices through the generation service (fake engine, MockClock):
one generation, one ticket of n slots, all of them freed together however it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager, suppress

import pytest
import trio
import trio.testing

from fabricai_trio.core.errors import DomainError
from fabricai_trio.core.events import CompleteEvent, TokenEvent
from fabricai_trio.core.requests import GenerationRequest
from fabricai_trio.generation import Generation
from fabricai_trio.settings import Settings

from .test_generation_cancel import CancelAtStep, Harness, running_service

SLOTS = 3


@asynccontextmanager
async def harness(**overrides: object) -> AsyncIterator[Harness]:
    settings = Settings(
        max_concurrent_requests=SLOTS, max_queue_size=4, sse_keepalive_seconds=0.05,
        store_timeout_seconds=1.0, max_choices=4, **overrides,  # type: ignore[arg-type]
    )
    async with running_service(settings) as h:
        yield h


def request(n: int = SLOTS, request_id: str = "r1", max_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(prompt="hello there", n=n, max_tokens=max_tokens,
                             request_id=request_id)


async def run_to_end(generation: Generation) -> list[object]:
    async with aclosing(generation.events()) as events:
        return [event async for event in events]


async def test_n_choices_run_at_once_and_complete_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        generation = await h.service.prepare(request(), owner="alice")
        seen = await run_to_end(generation)
        complete = seen[-1]
        assert isinstance(complete, CompleteEvent) and complete.choices is not None
        assert [c.index for c in complete.choices] == [0, 1, 2]
        for choice in complete.choices:
            texts = [e.text for e in seen if isinstance(e, TokenEvent) and e.choice == choice.index]
            assert "".join(texts) == choice.text and len(texts) == 4
            assert (choice.finish_reason, choice.completion_tokens) == ("length", 4)
        assert complete.text == complete.choices[0].text
        assert complete.usage.completion_tokens == 12
        assert complete.usage.prompt_tokens == generation.prompt_tokens
        assert h.engine.max_in_use == SLOTS  # the three streams ran side by side
        assert h.admission.stats().active == 0 and h.service.live_count == 0


async def test_one_request_of_n_holds_n_slots_and_others_wait_for_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        first = await h.service.prepare(request(n=2, max_tokens=50), owner="alice")
        second = await h.service.prepare(request(n=2, request_id="r2"), owner="bob")
        single = await h.service.prepare(request(n=1, request_id="r3"), owner="carol")
        order: list[str] = []

        async def drive(generation: Generation) -> None:
            async with aclosing(generation.events()) as events:
                async for event in events:
                    if isinstance(event, TokenEvent) and generation.request_id not in order:
                        order.append(generation.request_id)

        async with trio.open_nursery() as nursery:
            for g in (first, second, single):
                nursery.start_soon(drive, g)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.05)
            stats = h.admission.stats()
            # r1 holds 2 slots; r2 needs 2 of the 1 left and waits with none held;
            # r3 came after r2 and waits behind it.
            assert (stats.active, stats.queued) == (2, 2)
        assert order[0] == "r1" and set(order) == {"r1", "r2", "r3"}
        assert first.admitted_at is not None and second.admitted_at is not None
        assert single.admitted_at is not None
        assert first.admitted_at < second.admitted_at <= single.admitted_at
        assert h.engine.max_in_use <= SLOTS


async def test_cancel_ends_every_choice_and_frees_every_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        generation = await h.service.prepare(request(max_tokens=100), owner="alice")
        seen: list[object] = []

        async def drive() -> None:
            async with aclosing(generation.events()) as events:
                async for event in events:
                    seen.append(event)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drive)
            await trio.sleep(0.2)
            assert h.admission.stats().active == SLOTS and h.engine.in_use == SLOTS
            assert await h.service.cancel("alice", "r1", "cancel")
        complete = seen[-1]
        assert isinstance(complete, CompleteEvent) and complete.finish_reason == "cancelled"
        assert complete.choices is not None
        assert {c.finish_reason for c in complete.choices} == {"cancelled"}
        assert h.admission.stats().active == 0 and h.engine.in_use == 0
        assert h.service.live_count == 0


async def test_cancel_at_every_checkpoint_frees_all_slots(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A disconnect (the consumer's scope cancelled) at any checkpoint of an n=3
    generation: no slot, queue place or engine stream is left, nothing stays live."""

    async def run(h: Harness, probe: CancelAtStep) -> None:
        probe.task = trio.lowlevel.current_task()
        with trio.CancelScope() as scope:
            probe.scope = scope
            generation = await h.service.prepare(request(), owner="alice")
            try:
                await run_to_end(generation)
            finally:
                with trio.CancelScope(shield=True):
                    await generation.close()
        probe.scope = None

    async with harness() as h:
        probe = CancelAtStep(10**9)
        trio.lowlevel.add_instrument(probe)
        try:
            await run(h, probe)
        finally:
            trio.lowlevel.remove_instrument(probe)
        total = probe.steps
    assert total > 12
    for k in range(1, total + 1):
        async with harness() as h:
            probe = CancelAtStep(k)
            trio.lowlevel.add_instrument(probe)
            try:
                with suppress(DomainError):
                    await run(h, probe)
            finally:
                trio.lowlevel.remove_instrument(probe)
            await trio.testing.wait_all_tasks_blocked()
            stats = h.admission.stats()
            assert (stats.active, stats.queued) == (0, 0), k
            assert h.engine.in_use == 0, k
            assert h.service.live_count == 0, k
            after = await h.service.prepare(request(request_id="next"), owner="alice")
            assert isinstance((await run_to_end(after))[-1], CompleteEvent), k


@pytest.mark.parametrize(
    ("n", "extra", "code"),
    [(5, {}, "too_many_choices"),  # over MAX_CHOICES (4)
     (4, {}, "too_many_choices"),  # over the model's 3 slots
     (2, {"session_id": "s1"}, "invalid_value")],  # one reply per session turn
)
async def test_refused_n_names_the_field(
    autojump_clock: trio.testing.MockClock, n: int, extra: dict[str, str], code: str
) -> None:
    async with harness() as h:
        await h.store.create("alice", session_id="s1")
        with pytest.raises(DomainError) as refused:
            await h.service.prepare(
                GenerationRequest(prompt="x", n=n, **extra), owner="alice")  # type: ignore[arg-type]
        assert (refused.value.code, refused.value.param, refused.value.status_hint) == (
            code, "n", 400)
        assert h.admission.stats().queued == 0
        assert await h.store.try_lock("s1", "probe", 5.0)  # no lock was taken
