"""A small bounded buffer between a generation and the transport writing to its client.

Without it a stream's generation advanced only as fast as its socket took bytes: a
client that stopped reading held its slot for ever. With it the generation's frames go
into an `Outbox` (`pump`, a task of the request) and the transport writes them from
there; a frame counts against the limit until the transport says it is written. A
client whose oldest unwritten frame has waited `timeout` seconds is *slow*: `pump`
calls `on_slow` (the generation is cancelled with the cause `slow_client`), drops what
the generation still produces except its last frames (so a client that is only slow,
not gone, still learns how it ended), and the transport's own write deadline closes a
connection that takes nothing at all.

No sockets here: the clock is trio's, so `trio.testing.MockClock` drives the tests.
"""

from __future__ import annotations

import collections
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


@dataclass(slots=True)
class _Entry(Generic[T]):
    frame: T
    size: int
    queued_at: float
    taken: bool = False


class Outbox(Generic[T]):
    """Frames waiting for one client, at most `max_bytes` of them (one frame is always
    accepted, whatever its size), each counted until `written()`."""

    def __init__(self, *, max_bytes: int, timeout: float) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._entries: collections.deque[_Entry[T]] = collections.deque()
        self._bytes = 0
        self._closed = False
        self._released = False
        self.slow = False
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def buffered_bytes(self) -> int:
        """Bytes queued or being written."""
        return self._bytes

    def overdue(self) -> bool:
        """The oldest unwritten frame has waited `timeout` seconds or more."""
        return bool(self._entries) and (
            trio.current_time() - self._entries[0].queued_at >= self.timeout
        )

    def mark_slow(self) -> None:
        """From now on `put()` drops frames (unless `force`d) and returns False."""
        self.slow = True
        self._notify()

    def release(self) -> None:
        """The generation is ending (it was cancelled): `put()` stops waiting for room,
        so its last few events get through and it can end now, not when the client reads.
        """
        self._released = True
        self._notify()

    async def put(self, frame: T, size: int, *, force: bool = False) -> bool:
        """Queue a frame; waits while the buffer is full. False if the client is slow
        (the frame is dropped), unless `force` (queued whatever the buffer holds).

        Cancellation while waiting leaves the frame out.
        """
        if force:
            await trio.lowlevel.checkpoint()
        else:
            while (not self.slow and not self._released and self._entries
                   and self._bytes + size > self.max_bytes):
                await self._changed.wait()
            if self.slow:
                await trio.lowlevel.checkpoint()
                return False
        self._entries.append(_Entry(frame, size, trio.current_time()))
        self._bytes += size
        self._notify()
        await trio.lowlevel.checkpoint()
        return True

    def close(self) -> None:
        """No more frames: the consumer gets what is queued, then the end."""
        self._closed = True
        self._notify()

    async def get(self) -> T | None:
        """The next frame to write (it still counts until `written()`), or None once
        closed and empty. Cancellation loses nothing."""
        while True:
            entry = next((e for e in self._entries if not e.taken), None)
            if entry is not None:
                await trio.lowlevel.checkpoint()
                entry.taken = True
                return entry.frame
            if self._closed:
                await trio.lowlevel.checkpoint()
                return None
            await self._changed.wait()

    def written(self) -> None:
        """The oldest frame taken by `get()` is written: it leaves the buffer."""
        if self._entries and self._entries[0].taken:
            entry = self._entries.popleft()
            self._bytes -= entry.size
            self._notify()

    async def wait_overdue(self) -> None:
        """Return once the oldest unwritten frame is `timeout` seconds old (or the
        outbox is marked slow). Cancellation is harmless."""
        while not self.slow:
            deadline = self._entries[0].queued_at + self.timeout if self._entries else math.inf
            with trio.move_on_at(deadline):
                await self._changed.wait()
            if self.overdue():
                return
        await trio.lowlevel.checkpoint()

    async def frames(self) -> AsyncIterator[T]:
        """Iterate the frames for a writer that writes each one before asking for the
        next (a Quart response body): a frame is `written()` when the next is asked."""
        while (frame := await self.get()) is not None:
            yield frame
            self.written()


async def pump(
    source: AsyncGenerator[bytes, None],
    outbox: Outbox[bytes],
    *,
    on_slow: Callable[[], None],
    finished: Callable[[], bool],
) -> None:
    """Move `source`'s frames into `outbox`, then close it; run it as a task of the
    request that writes the outbox.

    When the client is slow (its oldest frame overdue), `on_slow()` is called once and
    later frames are dropped, except those produced once `finished()` is true (the
    generation's last event, forced in). Cancelled (the client went away): `source` is
    closed, which cancels its generation.
    """
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            await outbox.wait_overdue()
            outbox.mark_slow()
            on_slow()

        nursery.start_soon(watch)
        try:
            async with aclosing(source) as frames:
                async for frame in frames:
                    if not await outbox.put(frame, len(frame), force=outbox.slow and finished()):
                        continue
        finally:
            outbox.close()
        nursery.cancel_scope.cancel()
