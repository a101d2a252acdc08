"""The queue and the limiter, deterministically (no model, no sockets)."""

from __future__ import annotations

import contextlib
import random
from collections import Counter

import pytest
import trio
import trio.testing

from fabricai_trio.admission import Admission, AdmissionStats, ClassStats, Ticket
from fabricai_trio.core.errors import PerKeyLimit, QueueFull, TooManyChoices
from fabricai_trio.queue_policy import FairPolicy, FifoPolicy, PriorityPolicy


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


@pytest.mark.parametrize(("slots", "queue", "per_key"), [(1, 0, 0), (2, 3, 0), (1, 4, 2)])
async def test_may_refuse_is_true_exactly_when_someone_is_refused(
    slots: int, queue: int, per_key: int
) -> None:
    """The fast path's gate: False means `check_room` passes for everyone; True that
    it refuses someone (a principal at its share, or all when the queue is full)."""
    rng = random.Random(slots * 100 + queue * 10 + per_key)
    principals = ["a", "b", "c"]
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(
            max_concurrent=slots, max_queue=queue, max_queued_per_key=per_key))
        held: list[Ticket] = []
        for _ in range(300):
            if held and rng.random() < 0.4:
                held.pop(rng.randrange(len(held))).release()
            else:
                with contextlib.suppress(QueueFull, PerKeyLimit):
                    held.append(admission.try_enter(principal=rng.choice(principals)))
            await trio.testing.wait_all_tasks_blocked()
            refused = set()
            for principal in [*principals, "newcomer"]:
                try:
                    admission.check_room(principal=principal)
                except (QueueFull, PerKeyLimit):
                    refused.add(principal)
            assert admission.may_refuse() == bool(refused)
        nursery.cancel_scope.cancel()


# --- fairness between principals and per-principal caps ---


async def test_a_flood_does_not_delay_another_principal_more_than_one_turn() -> None:
    """A queues 20 behind its running one; B's one request goes next, and positions
    in the queue say so."""
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(max_concurrent=1, max_queue=32))
        flood = [admission.try_enter(principal="a", cost=50) for _ in range(20)]
        await trio.testing.wait_all_tasks_blocked()
        assert flood[0].admitted
        b = admission.try_enter(principal="b", cost=50)
        assert b.position == 0
        assert [t.position for t in flood[1:3]] == [1, 2]
        flood[0].release()
        await trio.testing.wait_all_tasks_blocked()
        assert b.admitted and not flood[1].admitted
        for ticket in (b, *flood):
            ticket.release()
        nursery.cancel_scope.cancel()


async def test_fifo_policy_serves_arrivals_in_order() -> None:
    async with trio.open_nursery() as nursery:
        admission = await started(
            nursery, Admission(max_concurrent=1, max_queue=8, policy=FifoPolicy()))
        flood = [admission.try_enter(principal="a") for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        b = admission.try_enter(principal="b")
        assert b.position == 2  # behind a's two waiting
        for ticket in (*flood, b):
            ticket.release()
        nursery.cancel_scope.cancel()


async def test_queued_cap_refuses_only_the_principal_over_it() -> None:
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(
            max_concurrent=1, max_queue=10, max_queued_per_key=2, retry_after=4))
        a = [admission.try_enter(principal="a")]
        await trio.testing.wait_all_tasks_blocked()
        a += [admission.try_enter(principal="a") for _ in range(2)]  # 1 running, 2 waiting
        with pytest.raises(PerKeyLimit) as refused:
            admission.try_enter(principal="a")
        assert (refused.value.code, refused.value.retry_after) == ("per_key_limit", 4)
        with pytest.raises(PerKeyLimit):
            admission.check_room(principal="a")
        admission.check_room(principal="b")
        b = admission.try_enter(principal="b")
        assert admission.stats().queued == 3
        a[1].release()  # one of a's waiting leaves: a may queue one more
        a.append(admission.try_enter(principal="a"))
        for ticket in (*a, b):
            ticket.release()
        nursery.cancel_scope.cancel()


async def test_running_cap_passes_over_the_principal_and_lets_others_run() -> None:
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(
            max_concurrent=3, max_queue=10, max_concurrent_per_key=1))
        a = [admission.try_enter(principal="a") for _ in range(3)]
        b = admission.try_enter(principal="b")
        await trio.testing.wait_all_tasks_blocked()
        assert [t.admitted for t in a] == [True, False, False]
        assert b.admitted
        assert admission.stats().active == 2  # a third slot is free, a is at its cap
        a[0].release()
        await trio.testing.wait_all_tasks_blocked()
        assert a[1].admitted and not a[2].admitted
        a[2].release()  # leaves the queue while the dispatcher holds a marker for it
        a[1].release()
        await trio.testing.wait_all_tasks_blocked()
        c = [admission.try_enter(principal=p) for p in "cd"]
        await trio.testing.wait_all_tasks_blocked()
        assert all(t.admitted for t in c)
        for ticket in (b, *c):
            ticket.release()
        await trio.testing.wait_all_tasks_blocked()
        assert admission.stats() == AdmissionStats(
            max_concurrent=3, active=0, queued=0, queue_capacity=10,
            classes=(ClassStats(name="normal", queued=0, admitted=5),))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("running_cap", "queued_cap"), [(0, 0), (1, 0), (1, 2), (2, 1)])
async def test_random_principals_arrivals_and_cancellations_keep_the_invariants(
    running_cap: int, queued_cap: int, autojump_clock: trio.testing.MockClock,
) -> None:
    """Several principals arrive and leave at random (cancelled while queued or while
    running): no principal ever runs or waits beyond its caps, a principal that had
    nothing queued is never behind more than one ticket of any other, the waiting
    tickets' positions are 0..n-1, and nothing leaks."""
    rng = random.Random(running_cap * 10 + queued_cap)
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(
            max_concurrent=3, max_queue=8, max_concurrent_per_key=running_cap,
            max_queued_per_key=queued_cap))
        live: set[Ticket] = set()
        refused = 0

        def check() -> None:
            running = Counter(t.principal for t in live if t.admitted)
            waiting = Counter(t.principal for t in live if not t.admitted)
            if running_cap:
                assert max(running.values(), default=0) <= running_cap
            if queued_cap:
                assert max(waiting.values(), default=0) <= queued_cap
            assert admission.stats().queued == sum(waiting.values())
            assert sum(running.values()) == admission.stats().active <= 3
            positions = sorted(t.position for t in live if not t.admitted)
            assert positions == list(range(len(positions)))

        async def client(principal: str) -> None:
            nonlocal refused
            alone = all(t.principal != principal or t.admitted for t in live)
            try:
                ticket = admission.try_enter(principal=principal, cost=rng.choice([1, 20, 300]))
            except (QueueFull, PerKeyLimit):
                refused += 1
                return
            live.add(ticket)
            if alone and not ticket.admitted:
                ahead = [t for t in live if not t.admitted and t.position < ticket.position]
                assert max(Counter(t.principal for t in ahead).values(), default=0) <= 1
            check()
            try:
                with trio.move_on_after(rng.random() * 0.08):
                    await ticket.wait()
                    check()
                    await trio.sleep(rng.random() * 0.05)
            finally:
                ticket.release()
                live.discard(ticket)

        async with trio.open_nursery() as clients:
            for _ in range(400):
                clients.start_soon(client, rng.choice("aaaabbc"))
                await trio.sleep(rng.random() * 0.004)
        await trio.testing.wait_all_tasks_blocked()
        stats = admission.stats()
        assert (stats.active, stats.queued) == (0, 0)
        assert refused > 0
        assert admission._abandoned >= 0
        assert not admission._running and not admission._waiting
        tickets = [admission.try_enter(principal=p) for p in "xyz"]
        await trio.testing.wait_all_tasks_blocked()
        assert all(t.admitted for t in tickets)
        nursery.cancel_scope.cancel()


# --- priority classes ---

CLASSES = ("high", "normal", "low")


def prioritized(*, limit: int) -> Admission:
    return Admission(
        max_concurrent=1, max_queue=32, classes=CLASSES,
        policy=PriorityPolicy([FairPolicy[Ticket]() for _ in CLASSES], starvation_limit=limit),
    )


async def test_priority_order_and_the_starvation_bound_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One slot, each request holds it 1 s. A low key's three requests arrive first,
    then a high key floods ten: the high ones go first, but a low one runs after at
    most K = 2 high ones, so the low key's second request waits (K + 1) s, not 11 s.
    The positions the tickets were told on arrival are the order they ran in."""
    admission = prioritized(limit=2)
    admitted: list[tuple[str, float]] = []
    tickets: dict[str, Ticket] = {}

    async def client(name: str, priority: str, task_status: trio.TaskStatus[None]) -> None:
        ticket = admission.try_enter(principal=name[0], priority_class=priority)
        tickets[name] = ticket
        task_status.started()
        try:
            await ticket.wait()
            admitted.append((name, trio.current_time()))
            await trio.sleep(1)
        finally:
            ticket.release()

    async with trio.open_nursery() as nursery:
        await started(nursery, admission)
        async with trio.open_nursery() as clients:
            for name in ("l0", "l1", "l2"):
                await clients.start(client, name, "low")
            await trio.testing.wait_all_tasks_blocked()
            for i in range(10):
                await clients.start(client, f"h{i}", "high")
            positions = {name: t.position for name, t in tickets.items() if not t.admitted}
            stats = admission.stats()
            assert [(c.name, c.queued) for c in stats.classes] == [
                ("high", 10), ("normal", 0), ("low", 2)]
        nursery.cancel_scope.cancel()
    order = [name for name, _ in admitted]
    assert order == ["l0", "h0", "h1", "l1", "h2", "h3", "l2", *(f"h{i}" for i in range(4, 10))]
    assert sorted(positions, key=positions.__getitem__) == order[1:]
    assert dict(admitted)["l1"] - dict(admitted)["l0"] == 3.0  # (K + 1) holds of the slot
    assert [(c.name, c.admitted, c.queued) for c in admission.stats().classes] == [
        ("high", 10, 0), ("normal", 0, 0), ("low", 3, 0)]


async def test_a_class_it_does_not_know_is_the_default_class() -> None:
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, prioritized(limit=4))
        tickets = [admission.try_enter(principal="p", priority_class=name)
                   for name in ("high", None, "bogus", "low")]
        assert [t.priority_class for t in tickets] == ["high", "normal", "normal", "low"]
        defaulted = Admission(max_concurrent=1, max_queue=1, classes=("gold", "bronze"))
        assert defaulted.try_enter().priority_class == "bronze"  # no `normal`: the lowest
        for ticket in tickets:
            ticket.release()
        nursery.cancel_scope.cancel()


async def test_per_key_caps_hold_inside_the_classes() -> None:
    """A high key at its running cap is passed over (the free slot goes to a low key)
    and gets the next slot it frees; its queued cap refuses it alone."""
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(
            max_concurrent=2, max_queue=8, classes=CLASSES, max_concurrent_per_key=1,
            max_queued_per_key=2,
            policy=PriorityPolicy([FairPolicy[Ticket]() for _ in CLASSES], starvation_limit=1)))
        high = [admission.try_enter(principal="h", priority_class="high")]
        await trio.testing.wait_all_tasks_blocked()
        high += [admission.try_enter(principal="h", priority_class="high") for _ in range(2)]
        with pytest.raises(PerKeyLimit):
            admission.try_enter(principal="h", priority_class="high")
        low = admission.try_enter(principal="l", priority_class="low")
        await trio.testing.wait_all_tasks_blocked()
        # h runs one (its cap); the second slot goes to the low key, not to h's next.
        assert [t.admitted for t in high] == [True, False, False] and low.admitted
        high[0].release()
        await trio.testing.wait_all_tasks_blocked()
        assert high[1].admitted
        for ticket in (*high, low):
            ticket.release()
        nursery.cancel_scope.cancel()

# --- tickets for several slots (a request for n choices) ---


async def test_a_ticket_for_several_slots_gets_them_together_and_keeps_its_turn() -> None:
    """A 3-slot ticket waits until 3 slots are free, holding none meanwhile; a 1-slot
    ticket that came after it waits behind it although a slot is free (no starvation)."""
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(max_concurrent=3, max_queue=4))
        one = admission.try_enter()
        await trio.testing.wait_all_tasks_blocked()
        three = admission.try_enter(slots=3)
        later = admission.try_enter()
        await trio.testing.wait_all_tasks_blocked()
        assert one.admitted and not three.admitted and not later.admitted
        assert (three.position, later.position) == (0, 1)
        stats = admission.stats()
        assert (stats.active, stats.queued) == (1, 2)
        one.release()
        await trio.testing.wait_all_tasks_blocked()
        assert three.admitted and not later.admitted
        assert admission.stats().active == 3
        three.release()
        await trio.testing.wait_all_tasks_blocked()
        assert later.admitted and admission.stats().active == 1
        later.release()
        nursery.cancel_scope.cancel()


async def test_a_ticket_released_while_gathering_its_slots_frees_the_way() -> None:
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(max_concurrent=2, max_queue=4))
        one = admission.try_enter()
        await trio.testing.wait_all_tasks_blocked()
        two = admission.try_enter(slots=2)
        await trio.testing.wait_all_tasks_blocked()
        assert not two.admitted and admission.stats().queued == 1
        two.release()
        next_one = admission.try_enter()
        await trio.testing.wait_all_tasks_blocked()
        assert next_one.admitted  # the free slot goes to the next one at once
        stats = admission.stats()
        assert (stats.active, stats.queued) == (2, 0)
        for ticket in (one, next_one):
            ticket.release()
        await trio.testing.wait_all_tasks_blocked()
        assert admission.stats().active == 0
        nursery.cancel_scope.cancel()


async def test_more_slots_than_there_are_is_refused_by_name() -> None:
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(
            max_concurrent=3, max_queue=4, max_concurrent_per_key=2))
        for slots, limit in ((4, 3), (3, 2)):
            with pytest.raises(TooManyChoices) as refused:
                admission.try_enter(slots=slots)
            assert refused.value.param == "n" and refused.value.details["limit"] == limit
            assert refused.value.status_hint == 400
        admission.check_slots(2)
        assert admission.stats().queued == 0
        nursery.cancel_scope.cancel()


async def test_the_running_cap_counts_slots() -> None:
    """MAX_CONCURRENT_PER_KEY caps the slots a principal holds: its 2-slot request
    fills a cap of 2, so its next one waits while another principal's runs."""
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(
            max_concurrent=4, max_queue=4, max_concurrent_per_key=2))
        a_two = admission.try_enter(principal="a", slots=2)
        await trio.testing.wait_all_tasks_blocked()
        a_one = admission.try_enter(principal="a")
        b_two = admission.try_enter(principal="b", slots=2)
        await trio.testing.wait_all_tasks_blocked()
        assert a_two.admitted and b_two.admitted and not a_one.admitted
        a_two.release()
        await trio.testing.wait_all_tasks_blocked()
        assert a_one.admitted
        for ticket in (a_one, b_two):
            ticket.release()
        nursery.cancel_scope.cancel()


async def test_random_requests_for_several_slots_never_deadlock_nor_overcommit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Clients asking for 1 to 3 of 3 slots, leaving at random (queued, gathering or
    running): all that stay are served, slots in use never pass the capacity, and
    everything is given back."""
    rng = random.Random(4321)
    capacity = 3
    async with trio.open_nursery() as nursery:
        admission = await started(nursery, Admission(max_concurrent=capacity, max_queue=6))
        served = refused = 0
        peak = 0

        async def client() -> None:
            nonlocal served, refused, peak
            try:
                ticket = admission.try_enter(slots=rng.randint(1, capacity),
                                             principal=rng.choice("ab"))
            except QueueFull:
                refused += 1
                return
            patient = rng.random() < 0.7
            try:
                with trio.move_on_after(1000 if patient else rng.random() * 0.05):
                    await ticket.wait()
                    peak = max(peak, admission.stats().active)
                    assert admission.stats().active <= capacity
                    served += 1
                    await trio.sleep(rng.random() * 0.02)
            finally:
                ticket.release()

        with trio.fail_after(60):
            async with trio.open_nursery() as clients:
                for _ in range(300):
                    clients.start_soon(client)
                    await trio.sleep(rng.random() * 0.004)
        await trio.testing.wait_all_tasks_blocked()
        stats = admission.stats()
        assert (stats.active, stats.queued) == (0, 0)
        assert served > 50 and refused > 0 and peak == capacity
        big = admission.try_enter(slots=capacity)
        await trio.testing.wait_all_tasks_blocked()
        assert big.admitted
        big.release()
        nursery.cancel_scope.cancel()
