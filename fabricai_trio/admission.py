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
* A dispatcher task (`run()`, in the app's services nursery) borrows a token of the
  `CapacityLimiter` (as many as the engine can run at once: no engine keeps a waiting
  line of its own), waits until the policy picks a ticket (one not at its principal's
  cap), takes one marker and grants the token to that ticket.
* `Ticket.wait()` waits for the grant on a `trio.Event`, so it can be cancelled and
  called again (to send keepalives) without losing the ticket's place.
* `Ticket.release()` is synchronous and idempotent: it frees the token, or takes the
  ticket out of the policy; its marker then stays in the channel as an abandoned one,
  which the dispatcher skips, and which `try_enter()` drains when the channel is full.
  A request cancelled while queued therefore never reaches the engine.

Invariant: markers in the channel (plus the one the dispatcher may hold while every
waiting principal is at its running cap) = tickets waiting in the policy + `_abandoned`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .core.errors import PerKeyLimit, QueueFull
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
    active: int
    queued: int
    queue_capacity: int
    #: Per priority class, highest first.
    classes: tuple[ClassStats, ...] = ()


class _Token:
    """The borrower of one limiter token (the dispatcher's, then a ticket's)."""

    __slots__ = ()


class Ticket:
    """One request's place: queued, then admitted (holding a token), then released."""

    def __init__(self, admission: Admission, principal: str, cost: int, rank: int = 0) -> None:
        self.principal = principal
        #: Expected tokens (prompt + max_tokens): what a fair policy weighs turns by.
        self.cost = cost
        #: Its priority class's index in `Admission.classes` (0: the highest).
        self.rank = rank
        self._admission = admission
        self._granted = trio.Event()
        self._token: _Token | None = None
        self._released = False

    @property
    def admitted(self) -> bool:
        return self._granted.is_set() and not self._released

    @property
    def priority_class(self) -> str:
        return self._admission.classes[self.rank]

    @property
    def position(self) -> int:
        """Requests ahead of this one in the queue (0 when next, or admitted)."""
        return self._admission._policy.position(self)

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
        if self._token is not None:
            token, self._token = self._token, None
            admission._active -= 1
            _decrement(admission._running, self.principal)
            admission._limiter.release_on_behalf_of(token)
            admission._wake()
        elif admission._policy.remove(self):
            _decrement(admission._waiting, self.principal)
            admission._waiting_by_rank[self.rank] -= 1
            admission._abandoned += 1
            admission._wake()

    def _grant(self, token: _Token) -> None:
        self._token = token
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
        self._max_queue = max_queue
        self._retry_after = retry_after
        self._queue_in, self._queue_out = trio.open_memory_channel[None](max_queue)
        self._policy: QueuePolicy[Ticket] = policy if policy is not None else FairPolicy()
        self._max_running_per_key = max_concurrent_per_key
        self._max_queued_per_key = max_queued_per_key
        self._abandoned = 0  # markers in the channel whose ticket left the queue
        self._active = 0
        self._running: Counter[str] = Counter()  # principal -> tickets admitted
        self._waiting: Counter[str] = Counter()  # principal -> tickets in the policy
        self._changed = trio.Event()  # a ticket arrived, or one released its token

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Grant limiter tokens to queued tickets, in the policy's order, until cancelled.

        A token is borrowed *before* a ticket is picked, so a ticket leaves the queue
        only when it can run: the channel alone bounds the queue.
        """
        task_status.started()
        while True:
            token = _Token()
            await self._limiter.acquire_on_behalf_of(token)
            try:
                ticket = await self._next()
            except BaseException:
                self._limiter.release_on_behalf_of(token)
                raise
            self._active += 1
            self._running[ticket.principal] += 1
            self._admitted_by_rank[ticket.rank] += 1
            ticket._grant(token)

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
        return self._running[ticket.principal] >= self._max_running_per_key

    def _wake(self) -> None:
        self._changed.set()

    def check_room(self, *, principal: str | None = None) -> None:
        """Raise `QueueFull` (or `PerKeyLimit` for `principal`) if `try_enter()` would,
        now: lets a request be refused before any costly work (session reads,
        tokenization). Never checkpoints."""
        if principal is not None:
            self._check_principal(principal)
        if self._active >= self._limiter.total_tokens and len(self._policy) >= self._max_queue:
            raise QueueFull(self._retry_after)

    def try_enter(self, *, principal: str = "anonymous", cost: int = 1,
                  priority_class: str | None = None) -> Ticket:
        """Join the queue now, or raise `QueueFull` / `PerKeyLimit`. `cost` is the
        expected tokens (prompt + max_tokens); `priority_class` one of `classes` (None
        or another name: the default class). Never blocks, never checkpoints."""
        self._check_principal(principal)
        try:
            self._queue_in.send_nowait(None)
        except trio.WouldBlock:
            if not self._drain_abandoned():
                raise QueueFull(self._retry_after) from None
            self._queue_in.send_nowait(None)
        rank = self.rank_of(priority_class)
        ticket = Ticket(self, principal, cost, rank)
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
            queued=len(self._policy),
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


def _decrement(counter: Counter[str], key: str) -> None:
    """One fewer for `key`; a count that reaches 0 is dropped (memory bounded by the
    principals present)."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
