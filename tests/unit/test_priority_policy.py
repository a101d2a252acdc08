"""Priority classes over the fair (or FIFO) policy: synchronous, no trio, no clock."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from fabricai_trio.queue_policy import FairPolicy, FifoPolicy, PriorityPolicy, QueuePolicy

HIGH, NORMAL, LOW = 0, 1, 2


@dataclass(eq=False)
class Item:
    principal: str
    rank: int = NORMAL
    cost: int = 10
    name: str = ""

    def __repr__(self) -> str:
        return self.name or f"{self.principal}@{self.rank}"


def fair(classes: int = 3, limit: int = 2) -> PriorityPolicy[Item]:
    return PriorityPolicy([FairPolicy[Item]() for _ in range(classes)], starvation_limit=limit)


def drain(policy: QueuePolicy[Item]) -> list[Item]:
    out = []
    while (item := policy.pop()) is not None:
        out.append(item)
    return out


def test_higher_classes_go_first_and_principals_take_turns_within_a_class() -> None:
    policy = fair(limit=100)
    low = [Item("l", LOW, name=f"l{i}") for i in range(2)]
    normal = [Item(p, NORMAL, name=f"{p}{i}") for p in "ab" for i in range(2)]
    high = [Item("h", HIGH, name=f"h{i}") for i in range(2)]
    for item in (*low, *normal, *high):  # lowest first: arrival order does not matter
        policy.push(item)
    assert [i.name for i in drain(policy)] == ["h0", "h1", "a0", "b0", "a1", "b1", "l0", "l1"]


def test_a_lower_class_waits_behind_at_most_k_higher_admissions() -> None:
    """High floods; the low requests, queued first, each go after K high ones."""
    policy = fair(limit=3)
    lows = [Item("l", LOW, name=f"l{i}") for i in range(3)]
    for item in lows:
        policy.push(item)
    for i in range(20):
        policy.push(Item("h", HIGH, name=f"h{i}"))
    order = "".join(i.name[0] for i in drain(policy))
    assert order == "hhhl" * 3 + "h" * 11


def test_with_three_classes_flooding_each_lower_class_gets_one_in_k_plus_one() -> None:
    k = 2
    policy = fair(limit=k)
    for rank, letter in ((LOW, "l"), (NORMAL, "n"), (HIGH, "h")):
        for i in range(30):
            policy.push(Item(letter, rank, name=f"{letter}{i}"))
    order = [i.rank for i in drain(policy)]
    # Until a class's last admission (it waits all along), at most K admissions of
    # higher classes go between two of its own.
    for rank in (NORMAL, LOW):
        last = max(index for index, served in enumerate(order) if served == rank)
        higher = 0
        for served in order[:last + 1]:
            if served == rank:
                higher = 0
            elif served < rank:
                higher += 1
                assert higher <= k
    # The first admissions: two high, then the starved classes, the lowest first.
    assert order[:4] == [HIGH, HIGH, LOW, NORMAL]


def test_positions_replay_the_class_order() -> None:
    policy = fair(limit=2)
    items = [Item("l", LOW, name="l0"), Item("n", NORMAL, name="n0")]
    items += [Item("h", HIGH, name=f"h{i}") for i in range(4)]
    for item in items:
        policy.push(item)
    positions = {item.name: policy.position(item) for item in items}
    assert policy.ordered() == sorted(items, key=policy.position)
    order = [i.name for i in drain(policy)]
    assert order == ["h0", "h1", "l0", "n0", "h2", "h3"]
    assert [positions[name] for name in order] == list(range(6))


def test_a_class_held_back_by_its_key_cap_does_not_count_as_starved() -> None:
    """A low request whose principal is at its running cap is passed over and its
    class counts nothing: once its principal may run again, it still waits its K."""
    policy = fair(limit=2)
    low = Item("capped", LOW, name="low")
    policy.push(low)
    for i in range(10):
        policy.push(Item("h", HIGH, name=f"h{i}"))
    capped = True

    def skip(item: Item) -> bool:
        return capped and item.principal == "capped"

    assert [policy.pop(skip).name for _ in range(5)] == [f"h{i}" for i in range(5)]  # type: ignore[union-attr]
    capped = False
    assert [policy.pop(skip).name for _ in range(3)] == ["h5", "h6", "low"]  # type: ignore[union-attr]


def test_an_emptied_class_starts_afresh() -> None:
    policy = fair(limit=2)
    first = Item("l", LOW)
    policy.push(first)
    for _ in range(5):
        policy.push(Item("h", HIGH))
    assert policy.pop().rank == HIGH  # type: ignore[union-attr]
    assert policy.remove(first)  # the low class had one high admission counted; it left
    second = Item("l", LOW)
    policy.push(second)
    assert [policy.pop().rank for _ in range(3)] == [HIGH, HIGH, LOW]  # type: ignore[union-attr]


def test_fifo_inside_the_classes() -> None:
    policy = PriorityPolicy([FifoPolicy[Item]() for _ in range(2)], starvation_limit=1)
    items = [Item(p, rank, name=f"{p}{rank}") for p, rank in
             (("a", 1), ("b", 1), ("c", 0), ("d", 0), ("e", 0))]
    for item in items:
        policy.push(item)
    assert [i.name for i in drain(policy)] == ["c0", "a1", "d0", "b1", "e0"]


def test_one_class_is_exactly_its_inner_policy() -> None:
    rng = random.Random(3)
    alone: FairPolicy[Item] = FairPolicy()
    wrapped = fair(classes=1)
    pairs: list[tuple[Item, Item]] = []
    for _ in range(2000):
        roll = rng.random()
        if roll < 0.5:
            principal, cost = rng.choice("abcd"), rng.choice([1, 7, 60])
            pair = (Item(principal, 0, cost), Item(principal, 0, cost))
            alone.push(pair[0])
            wrapped.push(pair[1])
            pairs.append(pair)
        elif roll < 0.6 and pairs:
            gone = pairs.pop(rng.randrange(len(pairs)))
            assert alone.remove(gone[0]) and wrapped.remove(gone[1])
        else:
            skipped = rng.choice("abcd")

            def skip(item: Item, skipped: str = skipped) -> bool:
                return item.principal == skipped

            one, two = alone.pop(skip), wrapped.pop(skip)
            assert (one is None) == (two is None)
            if one is not None:
                assert (one.principal, one.cost) == (two.principal, two.cost)  # type: ignore[union-attr]
                pairs = [p for p in pairs if p[0] is not one]
        assert [alone.position(a) for a, _ in pairs] == [wrapped.position(b) for _, b in pairs]


@pytest.mark.parametrize("limit", [1, 3])
def test_random_traffic_keeps_positions_and_the_starvation_bound(limit: int) -> None:
    """Random pushes, removals and pops in three classes: positions are the order in
    which the current queue would be served, and a class that waits sees at most
    `limit` admissions of higher classes between two of its own."""
    rng = random.Random(limit)
    policy = fair(limit=limit)
    waiting: list[Item] = []
    higher_since: Counter[int] = Counter()  # per waiting class: higher admissions
    for _ in range(4000):
        roll = rng.random()
        if roll < 0.45:
            item = Item(rng.choice("abcdef"), rng.choice([HIGH, HIGH, NORMAL, LOW]),
                        cost=rng.choice([1, 5, 50, 400]))
            policy.push(item)
            waiting.append(item)
        elif roll < 0.55 and waiting:
            gone = waiting.pop(rng.randrange(len(waiting)))
            assert policy.remove(gone)
            if not any(i.rank == gone.rank for i in waiting):
                higher_since[gone.rank] = 0
        elif waiting:
            expected = min(waiting, key=policy.position)
            assert policy.position(expected) == 0
            waiting_classes = {i.rank for i in waiting}
            assert policy.pop() is expected
            waiting.remove(expected)
            higher_since[expected.rank] = 0
            for rank in waiting_classes:
                if rank > expected.rank:
                    higher_since[rank] += 1
                    assert higher_since[rank] <= limit
        assert len(policy) == len(waiting)
        assert sorted(policy.position(i) for i in waiting) == list(range(len(waiting)))
    expected_order = sorted(waiting, key=policy.position)
    assert drain(policy) == expected_order


def test_a_starvation_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        PriorityPolicy([FairPolicy[Item]()], starvation_limit=0)
