"""Admission control: a bounded memory channel (the queue) feeding a CapacityLimiter.

* `try_enter()` puts a `Ticket` into a `trio` memory channel of capacity
  `MAX_QUEUE_SIZE` with `send_nowait()`; `trio.WouldBlock` means the queue is full and
  becomes `QueueFull` (HTTP 429). It never blocks, so the 429 is immediate.
* A dispatcher task (`run()`, in the app's service nursery) borrows a limiter token
  (`MAX_CONCURRENT_REQUESTS` in all), takes the oldest ticket from the channel and
  grants it the token. Tickets are served first-in first-out.
* `Ticket.wait()` waits for the grant on a `trio.Event`, so it can be cancelled and
  called again (e.g. to send keepalives) without losing the ticket's place.
* `Ticket.release()` is synchronous and idempotent: it frees the token, or marks a
  queued ticket abandoned so the dispatcher skips it. A request cancelled while queued
  therefore never reaches the engine. Abandoned tickets still in the channel are
  compacted away when they would make a live request look like a full queue.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio


class QueueFull(Exception):
    """Every slot is busy and the queue is at capacity."""

    def __init__(self, capacity: int) -> None:
        super().__init__(f"the queue is full ({capacity} waiting)")
        self.capacity = capacity


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionStats:
    max_concurrent: int
    active: int
    queued: int
    queue_capacity: int


class _Token:
    """The borrower of one limiter token (the dispatcher's, then a ticket's)."""

    __slots__ = ()


class Ticket:
    """One request's place: queued, then admitted (holding a token), then released."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._granted = trio.Event()
        self._token: _Token | None = None
        self._released = False

    @property
    def admitted(self) -> bool:
        return self._granted.is_set() and not self._released

    @property
    def position(self) -> int:
        """Requests ahead of this one in the queue (0 when next, or admitted)."""
        return self._admission._position(self)

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
            admission._limiter.release_on_behalf_of(token)
        elif self in admission._waiting:
            del admission._waiting[self]
            admission._abandoned += 1

    def _grant(self, token: _Token) -> None:
        self._token = token
        self._granted.set()


class Admission:
    """The queue and the limiter; `run()` must be running for anything to be admitted."""

    def __init__(self, *, max_concurrent: int, max_queue: int) -> None:
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._max_queue = max_queue
        self._queue_in, self._queue_out = trio.open_memory_channel[Ticket](max_queue)
        self._waiting: dict[Ticket, None] = {}  # live queued tickets, oldest first
        self._abandoned = 0  # released tickets still sitting in the channel
        self._active = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Grant limiter tokens to queued tickets, oldest first, until cancelled.

        A token is borrowed *before* a ticket is taken, so a ticket leaves the channel
        only when it can run: the channel alone holds the queue.
        """
        task_status.started()
        while True:
            token = _Token()
            await self._limiter.acquire_on_behalf_of(token)
            try:
                ticket = await self._queue_out.receive()
                while ticket._released:
                    self._abandoned -= 1
                    ticket = await self._queue_out.receive()
            except BaseException:
                self._limiter.release_on_behalf_of(token)
                raise
            del self._waiting[ticket]
            self._active += 1
            ticket._grant(token)

    def try_enter(self) -> Ticket:
        """Join the queue now, or raise `QueueFull`. Never blocks, never checkpoints."""
        ticket = Ticket(self)
        try:
            self._queue_in.send_nowait(ticket)
        except trio.WouldBlock:
            if self._abandoned == 0 or not self._compact():
                raise QueueFull(self._max_queue) from None
            self._queue_in.send_nowait(ticket)
        self._waiting[ticket] = None
        return ticket

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            max_concurrent=int(self._limiter.total_tokens),
            active=self._active,
            queued=len(self._waiting),
            queue_capacity=self._max_queue,
        )

    def _position(self, ticket: Ticket) -> int:
        for index, waiting in enumerate(self._waiting):
            if waiting is ticket:
                return index
        return 0

    def _compact(self) -> bool:
        """Drop abandoned tickets from the channel, keeping order; True if room was made.

        Synchronous, so the dispatcher cannot interleave: the channel ends up holding
        exactly the live tickets, oldest first.
        """
        live: list[Ticket] = []
        while True:
            try:
                ticket = self._queue_out.receive_nowait()
            except trio.WouldBlock:
                break
            if ticket._released:
                self._abandoned -= 1
            else:
                live.append(ticket)
        for ticket in live:
            self._queue_in.send_nowait(ticket)
        return len(live) < self._max_queue
