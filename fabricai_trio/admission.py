"""Admission control: the one queue in front of a model's engine (one per served model).

* A bounded `trio` memory channel counts the queue: `try_enter()` puts a marker in it
  with `send_nowait()`, and `trio.WouldBlock` means the queue is full: `QueueFull` (a
  429) at once, never a wait. Markers are interchangeable; *which* waiting ticket runs
  next is the `QueuePolicy`'s decision (fair between principals or FIFO, see
  queue_policy.py).
* Per principal (an opaque string: API key owner, JWT subject, `anonymous`): at most
  `max_queued_per_key` waiting (one more is `PerKeyLimit`, a 429, while others still
  get in) and at most `max_concurrent_per_key` running (its other tickets wait, passed
  over by the policy); 0 is no cap.
* Each ticket has a priority class (one of `classes`, highest first; a request that
  names none, or an unknown one, gets `default_class`). With a `PriorityPolicy` the
  classes order the queue; either way they count: waiting and admitted per class.
* Slots are the tokens of a `trio.CapacityLimiter`: as many as the engine can run at
  once (no engine keeps a waiting line of its own). A ticket takes `slots` of them (a
  request for `n` choices takes n). A dispatcher task (`run()`, in the app's services
  nursery) borrows one token, waits until the policy picks a ticket (one whose
  principal's running slots stay within its cap), takes one marker and, once it has
  borrowed as many tokens as the ticket needs, grants them to it. The dispatcher is the
  limiter's only borrower and gathers tokens for one ticket at a time, so two requests
  for several slots cannot hold each other's; the one picked waits for tokens that
  running generations give back, and tickets picked after it wait behind it (no
  request for several slots starves behind a stream of single ones).
* `Ticket.wait()` waits for the grant on a `trio.Event`, so it can be cancelled and
  called again (to send keepalives) without losing the ticket's place.
* `Ticket.release()` is synchronous and idempotent: it frees the ticket's slots, or
  takes the ticket out of the policy (or out of the dispatcher's hands); its marker
  then stays in the channel as an abandoned one, which the dispatcher skips, and which
  `try_enter()` drains when the channel is full.
  A request cancelled while queued therefore never reaches the engine.

Invariant: markers in the channel (plus the one the dispatcher may hold while every
waiting principal is at its running cap) = tickets waiting in the policy + `_abandoned`;
limiter tokens borrowed = the admitted tickets' `slots` + those the dispatcher holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .core.errors import PerKeyLimit, QueueFull, TooManyChoices
from .queue_policy import FairPolicy, QueuePolicy

#: The one class when none are configured.
DEFAULT_CLASS = "normal"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClassStats:
    name: str
    queued: int  # waiting now
    admitted: int  # admitted since start


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionStats:
    max_concurrent: int
    #: Slots in use: a running request for `n` choices counts n.
    active: int
    queued: int
    queue_capacity: int
    #: Per priority class, highest first.
    classes: tuple[ClassStats, ...] = ()


class _Token:
    """The borrower of one limiter token (the dispatcher's, then a ticket's)."""

    __slots__ = ()


class Ticket:
    """One request's place: queued, then admitted (holding its tokens), then released."""

    def __init__(self, admission: Admission, principal: str, cost: int, rank: int = 0,
                 slots: int = 1) -> None:
        self.principal = principal
        #: Expected tokens (prompt + max_tokens): what a fair policy weighs turns by.
        self.cost = cost
        #: Its priority class's index in `Admission.classes` (0: the highest).
        self.rank = rank
        #: Slots it runs on (one per choice), granted together.
        self.slots = slots
        self._admission = admission
        self._granted = trio.Event()
        self._tokens: list[_Token] = []  # the limiter tokens it was granted
        self._released = False

    @property
    def admitted(self) -> bool:
        return self._granted.is_set() and not self._released

    @property
    def priority_class(self) -> str:
        return self._admission.classes[self.rank]

    @property
    def position(self) -> int:
        """Requests ahead of this one in the queue (0 when next, or admitted): the
        waiting ones the policy puts first, and the one gathering its slots."""
        admission = self._admission
        if self._granted.is_set() or self._released or admission._gathering in (None, self):
            return admission._policy.position(self)
        return admission._policy.position(self) + 1

    async def wait(self) -> None:
        """Wait until admitted. Cancel-safe: the ticket keeps its place in the queue."""
        if self._released:
            raise RuntimeError("the ticket was released")
        await self._granted.wait()

    def release(self) -> None:
        """Free the slot, or leave the queue. Idempotent, synchronous, never raises."""
        if self._released:
            return
        self._released = True
        admission = self._admission
        if self._tokens:
            tokens, self._tokens = self._tokens, []
            admission._active -= len(tokens)
            _decrement(admission._running, self.principal, self.slots)
            admission._give_back(tokens)  # wakes the dispatcher
        elif admission._policy.remove(self):
            _decrement(admission._waiting, self.principal)
            admission._waiting_by_rank[self.rank] -= 1
            admission._abandoned += 1
            admission._wake()
        elif admission._gathering is self:  # picked, waiting for its slots: drop it
            admission._wake()

    def _grant(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._granted.set()


class Admission:
    """The queue and the limiter; `run()` must be running for anything to be admitted."""

    def __init__(
        self,
        *,
        max_concurrent: int,
        max_queue: int,
        retry_after: int = 1,
        policy: QueuePolicy[Ticket] | None = None,
        max_concurrent_per_key: int = 0,
        max_queued_per_key: int = 0,
        classes: Sequence[str] = (DEFAULT_CLASS,),
        default_class: str | None = None,
    ) -> None:
        if not classes:
            raise ValueError("at least one priority class")
        #: Priority class names, highest first (a `PriorityPolicy` orders by them).
        self.classes: tuple[str, ...] = tuple(classes)
        self._ranks = {name: rank for rank, name in enumerate(self.classes)}
        if default_class is None:  # as settings resolve PRIORITY_DEFAULT_CLASS
            default_class = DEFAULT_CLASS if DEFAULT_CLASS in self._ranks else self.classes[-1]
        self._default_rank = self._ranks[default_class]
        self._waiting_by_rank = [0] * len(self.classes)
        self._admitted_by_rank = [0] * len(self.classes)
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._active = 0  # tokens granted to tickets (the dispatcher may hold more)
        self._gathering: Ticket | None = None  # picked, waiting for enough free slots
        self._max_queue = max_queue
        self._retry_after = retry_after
        self._queue_in, self._queue_out = trio.open_memory_channel[None](max_queue)
        self._policy: QueuePolicy[Ticket] = policy if policy is not None else FairPolicy()
        self._max_running_per_key = max_concurrent_per_key
        self._max_queued_per_key = max_queued_per_key
        self._abandoned = 0  # markers in the channel whose ticket left the queue
        self._running: Counter[str] = Counter()  # principal -> slots of its admitted tickets
        self._waiting: Counter[str] = Counter()  # principal -> tickets in the policy
        self._changed = trio.Event()  # a ticket arrived or left, or slots were freed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Grant limiter tokens to queued tickets, in the policy's order, until cancelled.

        A token is borrowed *before* a ticket is picked, so a ticket leaves the queue
        only when it can start (or, for several slots, when it is next to): the channel
        alone bounds the queue. Cancelled at any point: the tokens it holds go back,
        nothing was granted.
        """
        task_status.started()
        while True:
            tokens = [_Token()]
            await self._limiter.acquire_on_behalf_of(tokens[0])
            try:
                ticket = await self._next()
                self._gathering = ticket
                while not ticket._released and len(tokens) < ticket.slots:
                    if self._limiter.available_tokens:
                        tokens.append(_Token())
                        self._limiter.acquire_on_behalf_of_nowait(tokens[-1])
                    else:  # a release gives tokens back, or the ticket leaves
                        await self._wait_changed()
            except BaseException:
                self._give_back(tokens)
                raise
            finally:
                self._gathering = None
            if ticket._released:  # it left while picked: its marker is spent
                self._give_back(tokens)
                continue
            self._active += ticket.slots
            self._running[ticket.principal] += ticket.slots
            self._admitted_by_rank[ticket.rank] += 1
            ticket._grant(tokens)

    def _give_back(self, tokens: list[_Token]) -> None:
        for token in tokens:
            self._limiter.release_on_behalf_of(token)
        self._wake()

    async def _wait_changed(self) -> None:
        if self._changed.is_set():
            self._changed = trio.Event()
        await self._changed.wait()

    async def _next(self) -> Ticket:
        """Take a marker, then the ticket the policy picks for it.

        A marker taken while every waiting ticket's principal is at its running cap
        is held (it belongs to one of them) until a release or an arrival changes
        that; if its ticket leaves meanwhile, it was an abandoned one."""
        await self._queue_out.receive()
        while True:
            skip = self._at_cap if self._max_running_per_key else None
            ticket = self._policy.pop(skip)
            if ticket is not None:
                _decrement(self._waiting, ticket.principal)
                self._waiting_by_rank[ticket.rank] -= 1
                return ticket
            if not len(self._policy):  # nothing waits: the marker was an abandoned one
                self._abandoned -= 1
                await self._queue_out.receive()
                continue
            self._changed = trio.Event()
            await self._changed.wait()

    def _at_cap(self, ticket: Ticket) -> bool:
        return self._running[ticket.principal] + ticket.slots > self._max_running_per_key

    def _wake(self) -> None:
        self._changed.set()

    def check_room(self, *, principal: str | None = None) -> None:
        """Raise `QueueFull` (or `PerKeyLimit` for `principal`) if `try_enter()` would,
        now: lets a request be refused before any costly work (session reads,
        tokenization). Never checkpoints."""
        if principal is not None:
            self._check_principal(principal)
        if self._full():
            raise QueueFull(self._retry_after)

    def _full(self) -> bool:
        busy = self._active >= self._limiter.total_tokens or self._gathering is not None
        return busy and len(self._policy) >= self._max_queue

    def may_refuse(self) -> bool:
        """Whether `check_room()` refuses anyone now: the queue is full, or some
        principal holds its MAX_QUEUED_PER_KEY share. False means every request gets
        past `check_room()`; the HTTP fast path (api/refusals.py) asks this first, so a
        server with room pays nothing more per request. Never checkpoints."""
        if self._full():
            return True
        cap = self._max_queued_per_key
        return bool(cap) and any(waiting >= cap for waiting in self._waiting.values())

    def check_slots(self, slots: int) -> None:
        """`TooManyChoices` (a 400 naming `n`) if a ticket for `slots` slots could never
        run: more than the model's slots, or than MAX_CONCURRENT_PER_KEY. Never
        checkpoints."""
        cap = self._max_running_per_key
        capacity = int(self._limiter.total_tokens)
        if slots > capacity:
            raise TooManyChoices(slots, capacity, "the model's slots "
                                 "(MAX_CONCURRENT_REQUESTS)")
        if cap and slots > cap:
            raise TooManyChoices(slots, cap, "the generations one identity may run at "
                                 "once (MAX_CONCURRENT_PER_KEY)")

    def try_enter(self, *, principal: str = "anonymous", cost: int = 1,
                  priority_class: str | None = None, slots: int = 1) -> Ticket:
        """Join the queue now, or raise `QueueFull` / `PerKeyLimit` (`TooManyChoices` if
        `slots` could never be granted). `cost` is the expected tokens (prompt +
        max_tokens of every choice); `priority_class` one of `classes` (None or another
        name: the default class); `slots` how many it runs on (its choices). Never
        blocks, never checkpoints."""
        self.check_slots(slots)
        self._check_principal(principal)
        try:
            self._queue_in.send_nowait(None)
        except trio.WouldBlock:
            if not self._drain_abandoned():
                raise QueueFull(self._retry_after) from None
            self._queue_in.send_nowait(None)
        rank = self.rank_of(priority_class)
        ticket = Ticket(self, principal, cost, rank, slots)
        self._policy.push(ticket)
        self._waiting[principal] += 1
        self._waiting_by_rank[rank] += 1
        self._wake()
        return ticket

    def _check_principal(self, principal: str) -> None:
        """`PerKeyLimit` if `principal` may not queue one more ticket."""
        cap = self._max_queued_per_key
        if not cap or self._waiting[principal] < cap:
            return
        raise PerKeyLimit(
            f"this identity already has {self._waiting[principal]} requests waiting "
            f"(MAX_QUEUED_PER_KEY={cap}); retry later",
            retry_after=self._retry_after,
        )

    def rank_of(self, priority_class: str | None) -> int:
        """The index of `priority_class` in `classes`; the default class's if it is
        None or not one of them."""
        if priority_class is None:
            return self._default_rank
        return self._ranks.get(priority_class, self._default_rank)

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            max_concurrent=int(self._limiter.total_tokens),
            active=self._active,
            queued=len(self._policy) + (self._gathering is not None),
            queue_capacity=self._max_queue,
            classes=tuple(
                ClassStats(name=name, queued=self._waiting_by_rank[rank],
                           admitted=self._admitted_by_rank[rank])
                for rank, name in enumerate(self.classes)
            ),
        )

    def _drain_abandoned(self) -> bool:
        """Take abandoned markers out of a full channel; True if room was made.

        Synchronous, so the dispatcher cannot interleave."""
        drained = False
        while self._abandoned:
            try:
                self._queue_out.receive_nowait()
            except trio.WouldBlock:
                break
            self._abandoned -= 1
            drained = True
        return drained


def _decrement(counter: Counter[str], key: str, n: int = 1) -> None:
    """`n` fewer for `key`; a count that reaches 0 is dropped (memory bounded by the
    principals present)."""
    counter[key] -= n
    if counter[key] <= 0:
        del counter[key]
