"""The queue and the limiter, deterministically (no model, no sockets)."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from fabricai_trio.admission import Admission, Ticket
from fabricai_trio.core.errors import QueueFull


async def started(nursery: trio.Nursery, admission: Admission) -> Admission:
    await nursery.start(admission.run)
    await trio.testing.wait_all_tasks_blocked()
    return admission


async def test_admits_up_to_the_limit_then_queues_then_refuses() -> None:
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(max_concurrent=2, max_queue=2))
        tickets = []
        for _ in range(4):
            tickets.append(admission.try_enter())
            await trio.testing.wait_all_tasks_blocked()
        assert [t.admitted for t in tickets] == [True, True, False, False]
        assert [t.position for t in tickets[2:]] == [0, 1]
        with pytest.raises(QueueFull):
            admission.try_enter()
        stats = admission.stats()
        assert (stats.active, stats.queued, stats.queue_capacity) == (2, 2, 2)
        tickets[0].release()
        await trio.testing.wait_all_tasks_blocked()
        assert tickets[2].admitted and not tickets[3].admitted
        assert tickets[3].position == 0
        nursery.cancel_scope.cancel()


async def test_first_in_first_out() -> None:
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(max_concurrent=1, max_queue=10))
        first = admission.try_enter()
        order: list[int] = []

        async def waiter(i: int, task_status: trio.TaskStatus[None]) -> None:
            ticket = admission.try_enter()
            task_status.started()
            await ticket.wait()
            order.append(i)
            ticket.release()

        for i in range(5):
            await nursery.start(waiter, i)
        first.release()
        await trio.testing.wait_all_tasks_blocked()
        assert order == [0, 1, 2, 3, 4]
        nursery.cancel_scope.cancel()


async def test_released_while_queued_never_runs_and_frees_its_place() -> None:
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(max_concurrent=1, max_queue=2))
        running = admission.try_enter()
        await trio.testing.wait_all_tasks_blocked()
        gone = admission.try_enter()
        kept = admission.try_enter()
        gone.release()
        assert admission.stats().queued == 1
        # The abandoned ticket still sits in the channel: it must not cost a place.
        late = admission.try_enter()
        assert [t.position for t in (kept, late)] == [0, 1]
        running.release()
        await trio.testing.wait_all_tasks_blocked()
        assert kept.admitted and not gone.admitted and not late.admitted
        nursery.cancel_scope.cancel()


async def test_wait_is_cancel_safe_and_keeps_the_place() -> None:
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(max_concurrent=1, max_queue=5))
        running = admission.try_enter()
        ticket = admission.try_enter()
        later = admission.try_enter()
        for _ in range(3):
            with trio.move_on_after(0.01):
                await ticket.wait()
        assert ticket.position == 0 and later.position == 1
        running.release()
        await ticket.wait()
        assert ticket.admitted and not later.admitted
        nursery.cancel_scope.cancel()


async def test_no_queue_means_refuse_when_busy() -> None:
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(max_concurrent=1, max_queue=0))
        ticket = admission.try_enter()
        await trio.testing.wait_all_tasks_blocked()
        assert ticket.admitted
        with pytest.raises(QueueFull):
            admission.try_enter()
        ticket.release()
        await trio.testing.wait_all_tasks_blocked()
        assert admission.try_enter() is not None
        nursery.cancel_scope.cancel()


async def test_release_is_idempotent_and_returns_the_token_once() -> None:
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(max_concurrent=1, max_queue=1))
        ticket = admission.try_enter()
        await trio.testing.wait_all_tasks_blocked()
        ticket.release()
        ticket.release()
        await trio.testing.wait_all_tasks_blocked()
        assert admission.stats().active == 0
        again = admission.try_enter()
        await trio.testing.wait_all_tasks_blocked()
        assert again.admitted
        nursery.cancel_scope.cancel()


async def test_many_random_arrivals_and_cancellations_leak_nothing() -> None:
    rng = random.Random(1234)
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(max_concurrent=3, max_queue=4))
        refused = 0

        async def client() -> None:
            nonlocal refused
            try:
                ticket = admission.try_enter()
            except QueueFull:
                refused += 1
                return
            try:
                with trio.move_on_after(rng.random() * 0.05):
                    await ticket.wait()
                    await trio.sleep(rng.random() * 0.05)
            finally:
                ticket.release()

        async with trio.open_nursery() as clients:
            for _ in range(300):
                clients.start_soon(client)
                await trio.sleep(rng.random() * 0.005)
        await trio.testing.wait_all_tasks_blocked()
        stats = admission.stats()
        assert (stats.active, stats.queued) == (0, 0)
        assert refused > 0
        assert admission._abandoned >= 0
        # Still fully usable: all three tokens come back.
        tickets = [admission.try_enter() for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        assert all(t.admitted for t in tickets)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("slots", "queue"), [(1, 0), (2, 0), (1, 2), (2, 3)])
async def test_check_room_answers_as_try_enter_would(slots: int, queue: int) -> None:
    """The early refusal (before any costly work) never refuses a request that
    `try_enter` would take, and never lets one through that it would refuse."""
    rng = random.Random(slots * 10 + queue)
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(max_concurrent=slots, max_queue=queue))
        held: list[Ticket] = []
        for _ in range(300):
            if held and rng.random() < 0.4:
                held.pop(rng.randrange(len(held))).release()
                await trio.testing.wait_all_tasks_blocked()
                continue
            try:
                admission.check_room()
                room = True
            except QueueFull:
                room = False
            try:
                held.append(admission.try_enter())
                entered = True
            except QueueFull:
                entered = False
            assert room == entered
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
