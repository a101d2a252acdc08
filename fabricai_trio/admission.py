"""Admission control: the one queue in front of the engine.

* A bounded `trio` memory channel counts the queue: `try_enter()` puts a marker in it
  with `send_nowait()`, and `trio.WouldBlock` means the queue is full: `QueueFull` (a
  429) at once, never a wait. Markers are interchangeable; *which* waiting ticket runs
  next is the `QueuePolicy`'s decision (FIFO today, see queue_policy.py).
* A dispatcher task (`run()`, in the app's services nursery) borrows a token of the
  `CapacityLimiter` (as many as the engine can run at once: no engine keeps a waiting
  line of its own), takes one marker and grants the token to the ticket the policy
  picks.
* `Ticket.wait()` waits for the grant on a `trio.Event`, so it can be cancelled and
  called again (to send keepalives) without losing the ticket's place.
* `Ticket.release()` is synchronous and idempotent: it frees the token, or takes the
  ticket out of the policy; its marker then stays in the channel as an abandoned one,
  which the dispatcher skips, and which `try_enter()` drains when the channel is full.
  A request cancelled while queued therefore never reaches the engine.

Invariant: markers in the channel = tickets waiting in the policy + `_abandoned`.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from .core.errors import QueueFull
from .queue_policy import FifoPolicy, QueuePolicy


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

    def __init__(self, admission: Admission, principal: str) -> None:
        self.principal = principal
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
            admission._limiter.release_on_behalf_of(token)
        elif admission._policy.remove(self):
            admission._abandoned += 1

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
    ) -> None:
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._max_queue = max_queue
        self._retry_after = retry_after
        self._queue_in, self._queue_out = trio.open_memory_channel[None](max_queue)
        self._policy: QueuePolicy[Ticket] = policy if policy is not None else FifoPolicy()
        self._abandoned = 0  # markers in the channel whose ticket left the queue
        self._active = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Grant limiter tokens to queued tickets, in the policy's order, until cancelled.

        A token is borrowed *before* a marker is taken, so a ticket leaves the queue
        only when it can run: the channel alone bounds the queue.
        """
        task_status.started()
        while True:
            token = _Token()
            await self._limiter.acquire_on_behalf_of(token)
            try:
                while True:
                    await self._queue_out.receive()
                    ticket = self._policy.pop()
                    if ticket is not None:
                        break
                    self._abandoned -= 1
            except BaseException:
                self._limiter.release_on_behalf_of(token)
                raise
            self._active += 1
            ticket._grant(token)

    def check_room(self) -> None:
        """Raise `QueueFull` if `try_enter()` would, now: lets a request be refused
        before any costly work (session reads, tokenization). Never checkpoints."""
        if self._active >= self._limiter.total_tokens and len(self._policy) >= self._max_queue:
            raise QueueFull(self._retry_after)

    def try_enter(self, *, principal: str = "anonymous") -> Ticket:
        """Join the queue now, or raise `QueueFull`. Never blocks, never checkpoints."""
        try:
            self._queue_in.send_nowait(None)
        except trio.WouldBlock:
            if not self._drain_abandoned():
                raise QueueFull(self._retry_after) from None
            self._queue_in.send_nowait(None)
        ticket = Ticket(self, principal)
        self._policy.push(ticket)
        return ticket

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            max_concurrent=int(self._limiter.total_tokens),
            active=self._active,
            queued=len(self._policy),
            queue_capacity=self._max_queue,
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
