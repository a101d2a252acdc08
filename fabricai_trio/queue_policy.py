"""The order in which queued requests get a slot: one small interface, three policies.

`Admission` owns the bounds (how many run, how many may wait, per principal too) and
the waiting; a `QueuePolicy` only decides *which* waiting ticket goes next and where a
ticket stands. `FairPolicy` (QUEUE_POLICY=fair, the default) serves principals in turn;
`FifoPolicy` (QUEUE_POLICY=fifo) serves arrivals in order, for a gateway in front that
does its own fair sharing. `PriorityPolicy` (more than one of PRIORITY_CLASSES) puts one
of those per priority class and serves higher classes first, with a bound on how long
a lower class waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")


class QueuePolicy(Protocol[T]):
    """Holds waiting items; every method is synchronous and cheap."""

    def push(self, item: T) -> None:
        """`item` starts waiting."""

    def remove(self, item: T) -> bool:
        """`item` stops waiting (it left); False if it was not waiting."""

    def pop(self, skip: Callable[[T], bool] | None = None) -> T | None:
        """The item that goes next, no longer waiting; None if nothing waits.

        Items for which `skip` is true (a principal at its concurrency cap) are passed
        over and keep their place."""

    def peek(self, skip: Callable[[T], bool] | None = None) -> T | None:
        """The item `pop(skip)` would return, left waiting (nothing changes)."""

    def position(self, item: T) -> int:
        """How many items go before `item` (0: it is next, or it is not waiting)."""

    def ordered(self) -> list[T]:
        """Every waiting item, in the order `pop()` would return them if nothing else
        arrived and nothing were skipped (item `i` has `position` `i`)."""

    def __len__(self) -> int: ...


class FifoPolicy(QueuePolicy[T]):
    """First come, first served."""

    def __init__(self) -> None:
        self._items: dict[T, None] = {}  # insertion order is arrival order

    def push(self, item: T) -> None:
        self._items[item] = None

    def remove(self, item: T) -> bool:
        if item not in self._items:
            return False
        del self._items[item]
        return True

    def pop(self, skip: Callable[[T], bool] | None = None) -> T | None:
        item = self.peek(skip)
        if item is not None:
            del self._items[item]
        return item

    def peek(self, skip: Callable[[T], bool] | None = None) -> T | None:
        for item in self._items:
            if skip is None or not skip(item):
                return item
        return None

    def position(self, item: T) -> int:
        for index, waiting in enumerate(self._items):
            if waiting is item:
                return index
        return 0

    def ordered(self) -> list[T]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)


class Fair(Protocol):
    """What the fair policy reads of an item: whose it is and what it is expected to cost."""

    @property
    def principal(self) -> str: ...

    @property
    def cost(self) -> int: ...


F = TypeVar("F", bound=Fair)


class FairPolicy(QueuePolicy[F]):
    """Principals served in turn, weighted by expected tokens: start-time fair queuing,
    the tag-based form of deficit round robin.

    An item gets a start tag `S`: the finish tag (`S + cost`, cost >= 1) of its
    principal's previous item if that one is still waiting; else `V` (the start tag of
    the last item that went), or `V + 1/2` if the principal's last item finished after
    `V` (it has just had a turn). Items go in the order of (S, arrival). Every waiting
    item starts at `V` or later, so a principal with nothing waiting starts at or
    before every other principal's second item: it waits behind at most one request
    of each other principal, however many those queued (and behind none of a
    principal whose turn it just took). Principals that keep requests waiting get the
    same share of expected tokens; one whose queue emptied starts afresh, with no
    credit and no debt, as deficit round robin resets a flow's deficit.

    A principal at its running cap is passed over (`skip`) and keeps no head start for
    it (`_catch_up`).

    `position()` is exact for the current queue: the items that go before this one if
    nothing else arrives (a newcomer of another principal may still go first) and no
    principal is at its running cap when its turn comes.
    Memory: what is waiting, and the finish tags of at most `MAX_IDLE_TAGS` principals
    with nothing waiting.
    """

    #: Principals with nothing waiting whose finish tag is kept (a memory bound).
    MAX_IDLE_TAGS = 4096

    def __init__(self) -> None:
        self._tags: dict[F, tuple[float, int]] = {}  # waiting item -> (start tag, arrival)
        self._queues: dict[str, deque[F]] = {}  # principal -> its waiting items, in order
        self._finish: dict[str, float] = {}  # principal -> finish tag of its last item
        self._virtual = 0.0
        self._arrivals = 0

    def push(self, item: F) -> None:
        principal = item.principal
        last = self._finish.get(principal)
        if principal in self._queues and last is not None:
            start = last
        elif last is not None and last > self._virtual:
            start = self._virtual + 0.5
        else:
            start = self._virtual
        self._finish[principal] = start + max(1, item.cost)
        self._arrivals += 1
        self._tags[item] = (start, self._arrivals)
        self._queues.setdefault(principal, deque()).append(item)

    def remove(self, item: F) -> bool:
        if self._tags.pop(item, None) is None:
            return False
        queue = self._queues[item.principal]
        queue.remove(item)
        if not queue:
            del self._queues[item.principal]
        # Its turn stays spent: the principal's later items keep their tags.
        return True

    def pop(self, skip: Callable[[F], bool] | None = None) -> F | None:
        best, skipped = self._select(skip)
        if best is None:
            return None
        start, _ = self._tags.pop(best)
        queue = self._queues[best.principal]
        queue.popleft()
        if not queue:
            del self._queues[best.principal]
        self._virtual = max(self._virtual, start)
        for principal in skipped:
            self._catch_up(principal)
        self._forget_idle()
        return best

    def peek(self, skip: Callable[[F], bool] | None = None) -> F | None:
        return self._select(skip)[0]

    def _select(self, skip: Callable[[F], bool] | None) -> tuple[F | None, list[str]]:
        """The head with the smallest tag among principals not skipped, and the
        principals skipped."""
        best: F | None = None
        skipped: list[str] = []
        for principal, queue in self._queues.items():
            head = queue[0]
            if skip is not None and skip(head):
                skipped.append(principal)
                continue
            if best is None or self._tags[head] < self._tags[best]:
                best = head
        return best, skipped

    def position(self, item: F) -> int:
        tag = self._tags.get(item)
        if tag is None:
            return 0
        return sum(1 for other in self._tags.values() if other < tag)

    def ordered(self) -> list[F]:
        # A principal's tags grow along its queue, so the smallest tag is always a
        # head: popping in tag order is what `pop()` does.
        return sorted(self._tags, key=self._tags.__getitem__)

    def __len__(self) -> int:
        return len(self._tags)

    def _catch_up(self, principal: str) -> None:
        """A principal passed over (at its running cap) while `V` moved on keeps no
        head start: its items are moved forward so that the first starts at `V`, as a
        newcomer's would. Otherwise it would come back with a run of turns that have
        all gone by, and a newcomer would wait behind all of them."""
        queue = self._queues[principal]
        head_start, _ = self._tags[queue[0]]
        shift = self._virtual - head_start
        if shift <= 0:
            return
        for item in queue:
            start, arrival = self._tags[item]
            self._tags[item] = (start + shift, arrival)
        self._finish[principal] += shift

    def _forget_idle(self) -> None:
        """Bound the memory of finish tags: drop those of principals with nothing
        waiting that are at or behind `V` (they change nothing); past `MAX_IDLE_TAGS`
        idle principals, drop every idle one (each then starts at `V` like a newcomer:
        the one-request bound still holds)."""
        if len(self._finish) <= len(self._queues) + self.MAX_IDLE_TAGS // 2:
            return
        virtual = self._virtual
        for principal, finish in list(self._finish.items()):
            if finish <= virtual and principal not in self._queues:
                del self._finish[principal]
        if len(self._finish) > len(self._queues) + self.MAX_IDLE_TAGS:
            for principal in [p for p in self._finish if p not in self._queues]:
                del self._finish[principal]


class Ranked(Protocol):
    """What the priority policy reads of an item: its class, 0 being the highest."""

    @property
    def rank(self) -> int: ...


R = TypeVar("R", bound=Ranked)


class PriorityPolicy(QueuePolicy[R]):
    """Priority classes, each with its own policy (fair or FIFO) inside: the highest
    class with a request that can go goes first, with a bound on starvation.

    A class *waits* when its next request (its inner policy's `peek`, passing over
    what `skip` holds back) could go. Each class counts the admissions of higher
    classes made while it waited since its own last admission; a class whose count
    reached `starvation_limit` (K) goes next, before any higher class (the lowest
    such class first). So a waiting class sees at most K admissions of higher classes
    between two of its own: its next request waits behind at most K requests of
    higher classes. A class that empties starts its count afresh, and a class whose requests
    are all held back (MAX_CONCURRENT_PER_KEY) does not count (it is not starved by
    the others). With one class this is exactly its inner policy.

    `position()` replays that order over the current queue (no arrivals, nothing
    held back), so it is exact in the same sense as the inner policies': O(n log n).
    """

    def __init__(self, classes: Sequence[QueuePolicy[R]], *, starvation_limit: int) -> None:
        if not classes:
            raise ValueError("at least one class")
        if starvation_limit < 1:
            raise ValueError("starvation_limit must be at least 1")
        self._classes = list(classes)
        self._limit = starvation_limit
        #: Per class: admissions of higher classes while it waited (since its last).
        self._passed = [0] * len(classes)

    def push(self, item: R) -> None:
        self._classes[self._rank(item)].push(item)

    def remove(self, item: R) -> bool:
        rank = self._rank(item)
        removed = self._classes[rank].remove(item)
        if removed and not len(self._classes[rank]):
            self._passed[rank] = 0
        return removed

    def pop(self, skip: Callable[[R], bool] | None = None) -> R | None:
        waiting = [rank for rank, policy in enumerate(self._classes)
                   if len(policy) and policy.peek(skip) is not None]
        if not waiting:
            return None
        chosen = self._choose(waiting, self._passed)
        item = self._classes[chosen].pop(skip)
        assert item is not None  # peek said so, and nothing changed since
        self._count(chosen, waiting, self._passed)
        return item

    def peek(self, skip: Callable[[R], bool] | None = None) -> R | None:
        waiting = [rank for rank, policy in enumerate(self._classes)
                   if len(policy) and policy.peek(skip) is not None]
        if not waiting:
            return None
        return self._classes[self._choose(waiting, self._passed)].peek(skip)

    def position(self, item: R) -> int:
        rank = self._rank(item)
        if sum(1 for policy in self._classes if len(policy)) <= 1:
            return self._classes[rank].position(item)
        for index, other in enumerate(self.ordered()):
            if other is item:
                return index
        return 0

    def ordered(self) -> list[R]:
        """Replay `pop()` on copies of the class queues and counts."""
        queues = [deque(policy.ordered()) for policy in self._classes]
        passed = list(self._passed)
        out: list[R] = []
        while waiting := [rank for rank, queue in enumerate(queues) if queue]:
            chosen = self._choose(waiting, passed)
            out.append(queues[chosen].popleft())
            self._count(chosen, waiting, passed)
        return out

    def __len__(self) -> int:
        return sum(len(policy) for policy in self._classes)

    def _rank(self, item: R) -> int:
        return min(max(item.rank, 0), len(self._classes) - 1)

    def _choose(self, waiting: list[int], passed: list[int]) -> int:
        """Of the waiting classes: the lowest starved one, else the highest."""
        starved = [rank for rank in waiting if passed[rank] >= self._limit]
        return max(starved) if starved else min(waiting)

    @staticmethod
    def _count(chosen: int, waiting: list[int], passed: list[int]) -> None:
        """`chosen` had an admission: its count restarts, and every lower class that
        waited saw one more admission of a higher class."""
        passed[chosen] = 0
        for rank in waiting:
            if rank > chosen:
                passed[rank] += 1
