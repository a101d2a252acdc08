"""The fair queue policy on its own: synchronous, no trio, no clock."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from fabricai_trio.queue_policy import FairPolicy, FifoPolicy


@dataclass(eq=False)
class Item:
    principal: str
    cost: int = 10
    name: str = ""


def drain(policy: FairPolicy[Item]) -> list[Item]:
    out = []
    while (item := policy.pop()) is not None:
        out.append(item)
    return out


def test_one_principal_is_first_in_first_out() -> None:
    policy: FairPolicy[Item] = FairPolicy()
    items = [Item("a", name=str(i)) for i in range(5)]
    for item in items:
        policy.push(item)
    assert [policy.position(i) for i in items] == [0, 1, 2, 3, 4]
    assert drain(policy) == items


def test_a_newcomer_waits_behind_at_most_one_request_of_the_flooder() -> None:
    policy: FairPolicy[Item] = FairPolicy()
    flood = [Item("a", name=f"a{i}") for i in range(20)]
    for item in flood:
        policy.push(item)
    assert policy.pop() is flood[0]  # a0 runs
    b = Item("b", name="b")
    policy.push(b)
    # a1 was tagged after a0 had run: b goes next.
    assert policy.position(b) == 0
    assert policy.pop() is b


def test_a_newcomer_before_anything_ran_waits_behind_one() -> None:
    policy: FairPolicy[Item] = FairPolicy()
    flood = [Item("a") for _ in range(20)]
    for item in flood:
        policy.push(item)
    b = Item("b")
    policy.push(b)
    assert policy.position(b) == 1
    assert drain(policy)[:2] == [flood[0], b]


def test_principals_take_turns_and_positions_are_the_serving_order() -> None:
    policy: FairPolicy[Item] = FairPolicy()
    items = [Item(p, name=f"{p}{i}") for i in range(3) for p in "abc"]
    for item in sorted(items, key=lambda i: i.principal):  # a's, then b's, then c's
        policy.push(item)
    positions = {item.name: policy.position(item) for item in items}
    order = [item.name for item in drain(policy)]
    assert order == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]
    assert [positions[name] for name in order] == list(range(9))


def test_turns_are_weighted_by_expected_tokens() -> None:
    """Two busy principals get the same share of expected tokens: one request of 100
    tokens per ten of 10."""
    policy: FairPolicy[Item] = FairPolicy()
    for _ in range(30):
        policy.push(Item("big", cost=100))
    for _ in range(300):
        policy.push(Item("small", cost=10))
    served = Counter[str]()
    for _ in range(110):
        item = policy.pop()
        assert item is not None
        served[item.principal] += item.cost
    assert abs(served["big"] - served["small"]) <= 100


def test_an_idle_principal_earns_no_credit() -> None:
    policy: FairPolicy[Item] = FairPolicy()
    for _ in range(10):
        policy.push(Item("a"))
    for _ in range(5):
        policy.pop()
    later = [Item("b") for _ in range(5)]
    for item in later:
        policy.push(item)
    # b was away while a ran five: it does not get five turns in a row for it.
    order = [i.principal for i in drain(policy)]
    assert order[:4] in (["b", "a", "b", "a"], ["a", "b", "a", "b"])


def test_skip_passes_over_a_principal_and_keeps_its_place() -> None:
    for policy in (FairPolicy[Item](), FifoPolicy[Item]()):
        a, b = Item("a"), Item("b")
        policy.push(a)
        policy.push(b)
        assert policy.pop(lambda item: item.principal == "a") is b
        assert policy.pop(lambda item: item.principal == "a") is None
        assert policy.position(a) == 0
        assert policy.pop() is a


def test_removed_items_leave_and_their_turn_is_spent() -> None:
    policy: FairPolicy[Item] = FairPolicy()
    a0, a1, b0 = Item("a"), Item("a"), Item("b")
    for item in (a0, a1, b0):
        policy.push(item)
    assert policy.remove(a0) and not policy.remove(a0)
    assert len(policy) == 2
    assert policy.position(b0) == 0  # a0's turn stays spent: a1 keeps its later turn
    assert drain(policy) == [b0, a1]


def test_idle_principals_do_not_grow_memory() -> None:
    policy: FairPolicy[Item] = FairPolicy()
    for i in range(3 * FairPolicy.MAX_IDLE_TAGS):
        policy.push(Item(f"p{i}"))
        policy.pop()
    assert len(policy._finish) <= FairPolicy.MAX_IDLE_TAGS + 1
    assert (len(policy), policy._queues) == (0, {})


def test_a_principal_that_just_had_a_turn_goes_after_a_newcomer() -> None:
    """a's request runs and a sends its next; b's first request, sent after, still
    goes before it."""
    policy: FairPolicy[Item] = FairPolicy()
    a0 = Item("a")
    policy.push(a0)
    assert policy.pop() is a0
    a1, b0 = Item("a"), Item("b")
    policy.push(a1)
    policy.push(b0)
    assert (policy.position(b0), policy.position(a1)) == (0, 1)


def test_random_arrivals_and_departures_keep_the_invariants() -> None:
    """Under random pushes, removals and pops by several principals: positions are the
    order in which the current queue would be served, and a principal that had
    nothing waiting waits behind at most one item of each other principal."""
    rng = random.Random(7)
    policy: FairPolicy[Item] = FairPolicy()
    waiting: list[Item] = []
    for _ in range(3000):
        roll = rng.random()
        if roll < 0.5:
            principal = rng.choice("abcdef")
            alone = all(i.principal != principal for i in waiting)
            item = Item(principal, cost=rng.choice([1, 5, 50, 400]))
            policy.push(item)
            waiting.append(item)
            if alone:
                ahead = [i for i in waiting if policy.position(i) < policy.position(item)]
                assert max(Counter(i.principal for i in ahead).values(), default=0) <= 1
        elif roll < 0.65 and waiting:
            gone = waiting.pop(rng.randrange(len(waiting)))
            assert policy.remove(gone)
        elif waiting:
            expected = min(waiting, key=policy.position)
            assert policy.position(expected) == 0
            assert policy.pop() is expected
            waiting.remove(expected)
        assert len(policy) == len(waiting)
        assert sorted(policy.position(i) for i in waiting) == list(range(len(waiting)))
    # Positions are the whole serving order of what is left.
    by_position = sorted(waiting, key=policy.position)
    assert drain(policy) == by_position
