"""Admission control: a bounded queue in front of a `trio.CapacityLimiter`.

How it fits together:

* The limiter has `MAX_CONCURRENT_REQUESTS` tokens; each token is one running
  generation (one engine slot).
* A dispatcher task (in the app's service nursery) borrows a token for a fresh `Slot`
  and offers the slot on a zero-capacity `trio` memory channel. Requests that want to
  run wait on the receive end of that channel: the line of blocked receivers *is* the
  queue. Trio serves blocked receivers first-in first-out, and `receive()` is atomic
  with respect to cancellation: a request cancelled while queued leaves the line with
  no slot, and a request that got a slot got it exactly once.
* The line is bounded: `try_enter()` refuses (`QueueFull`, which the API turns into
  429) when `MAX_QUEUE_SIZE` requests already wait. The check and the entry are one
  synchronous step, so two requests can never both take the last place.

`try_enter()` is the non-blocking half (like trio's `*_nowait`), `Ticket.wait()` the
blocking half. `Ticket.release()` is idempotent and synchronous, so it is safe to call
from any `finally`, cancelled or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio


class QueueFull(Exception):
    """Every slot is busy and the queue is at capacity."""

    def __init__(self, capacity: int) -> None:
        super().__init__(f"the queue is full ({capacity} waiting)")
        self.capacity = capacity


class Slot:
    """The borrower of one limiter token; handed to exactly one request."""

    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AdmissionStats:
    max_concurrent: int
    active: int
    queued: int
    queue_capacity: int


class Ticket:
    """One request's place: queued, then running, then released."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._slot: Slot | None = None
        self._released = False

    @property
    def admitted(self) -> bool:
        return self._slot is not None

    @property
    def position(self) -> int:
        """How many requests are ahead (0: next in line, or already running)."""
        return self._admission._position(self)

    async def wait(self) -> None:
        """Wait for a slot.

        If cancelled, the ticket leaves the queue and no slot is taken; the
        cancellation propagates.
        """
        if self._released:
            raise RuntimeError("ticket was released")
        if self._slot is not None:
            await trio.lowlevel.checkpoint()
            return
        admission = self._admission
        try:
            slot = await admission._slots_out.receive()
        finally:
            admission._waiting.pop(self, None)
        self._slot = slot
        admission._active += 1
        if self._released:  # released by another task while this one was parked
            self._give_back()

    def release(self) -> None:
        """Leave the queue or free the slot. Idempotent, synchronous, never raises."""
        if self._released:
            return
        self._released = True
        if self._slot is None:
            self._admission._waiting.pop(self, None)
        else:
            self._give_back()

    def _give_back(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            self._admission._active -= 1
            self._admission._limiter.release_on_behalf_of(slot)


class Admission:
    """The queue and the limiter; `run()` must be running in a service nursery."""

    def __init__(self, *, max_concurrent: int, max_queue: int) -> None:
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._max_queue = max_queue
        self._slots_in, self._slots_out = trio.open_memory_channel[Slot](0)
        self._waiting: dict[Ticket, None] = {}  # insertion-ordered: the queue
        self._active = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Offer free slots to the queue until cancelled (app shutdown)."""
        task_status.started()
        while True:
            slot = Slot()
            await self._limiter.acquire_on_behalf_of(slot)
            try:
                await self._slots_in.send(slot)
            except BaseException:
                self._limiter.release_on_behalf_of(slot)
                raise

    def try_enter(self) -> Ticket:
        """Take a place in the queue now, or raise `QueueFull`. Never blocks."""
        ticket = Ticket(self)
        try:
            ticket._slot = self._slots_out.receive_nowait()
        except trio.WouldBlock:
            if len(self._waiting) >= self._max_queue:
                raise QueueFull(self._max_queue) from None
            self._waiting[ticket] = None
        else:
            self._active += 1
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
