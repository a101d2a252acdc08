"""What a reconnecting client is sent: the events of resumable streams, and the end of
every stream.

A generation writes its events here as it yields them (`Generation.events()`): every
event of a resumable generation, and only the final `complete`/`error` of the others.
A reconnect (`Last-Event-ID`, Socket.IO `inference_resume`) reads from here and never
starts a generation:

* the stream ended and nothing is missing: `NothingMissing` (SSE answers 204, so an
  `EventSource` stops reconnecting);
* events after the client's position are kept: they are replayed, then followed live
  until the final event;
* only the end is kept (the stream was not resumable): the final event is sent, which
  carries the whole text;
* nothing is kept for (owner, request id): `StreamNotFound` (404). The owner is part of
  the key, so one identity never reads another's stream.

`MemoryStreamLog` keeps the log in this process (bounded per stream by
RESUME_MAX_EVENTS, ended streams dropped after RESUME_TTL_SECONDS). With Redis,
`RedisStreamLog` (redis_stream_log.py) also mirrors it into a Redis Stream per request,
so a reconnect on any replica finds it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .core.errors import NotFound
from .core.events import StreamEvent
from .core.stream_ids import is_final

Key = tuple[str, str]  # (owner, request_id)
#: Ended streams kept at most, whatever their age: a bound on memory under heavy traffic.
MAX_ENDED_STREAMS = 10_000


class NothingMissing(Exception):
    """The stream ended and the client has seen its last event."""


class StreamNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("no stream of yours has this id (it may have expired)",
                         code="stream_not_found", param="Last-Event-ID")


@dataclass
class _Stream:
    events: list[tuple[int, StreamEvent]] = field(default_factory=list)
    final: int | None = None  # position of the final event, once written
    changed: trio.Event = field(default_factory=trio.Event)


class StreamLog(Protocol):
    def append(self, key: Key, position: int, event: StreamEvent) -> None:
        """Keep one event (in position order). Synchronous, never raises."""

    async def check(self, key: Key, after: int) -> None:
        """Raise `NothingMissing` or `StreamNotFound` as `follow` would, without
        reading: a transport decides its answer (204, 404) before it starts a body."""

    def follow(self, key: Key, after: int) -> AsyncIterator[tuple[int, StreamEvent]]:
        """Events after position `after`, then new ones as they come, until the final
        event. Raises `NothingMissing` or `StreamNotFound` before yielding anything.

        Cancellation just stops the reading."""

    def watching(self, key: Key) -> AbstractAsyncContextManager[None]:
        """While inside, tell the replica that runs `key` that a client follows it."""

    async def watched(self, key: Key) -> bool:
        """Whether a client on another replica follows `key` now."""


class MemoryStreamLog:
    """The log in this process: what this replica's own streams wrote."""

    def __init__(
        self,
        *,
        ttl_seconds: float,
        max_events: int,
        max_ended: int = MAX_ENDED_STREAMS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_events = max_events
        self.max_ended = max_ended
        self._clock = clock
        self._streams: dict[Key, _Stream] = {}
        self._ended: OrderedDict[Key, tuple[float, _Stream]] = OrderedDict()  # oldest first

    def append(self, key: Key, position: int, event: StreamEvent) -> None:
        self.add(key, position, event)

    def add(self, key: Key, position: int, event: StreamEvent) -> bool:
        """Keep one event; True if it starts a stream (replacing an ended one with the
        same owner and id)."""
        self._expire()
        stream = self._streams.get(key)
        fresh = stream is None or stream.final is not None
        if stream is None or fresh:
            stream = self._streams[key] = _Stream()
        stream.events.append((position, event))
        if len(stream.events) > self.max_events:
            del stream.events[0]
        if is_final(event):
            stream.final = position
            self._ended.pop(key, None)
            self._ended[key] = (self._clock(), stream)
        stream.changed.set()
        stream.changed = trio.Event()
        return fresh

    def knows(self, key: Key) -> bool:
        return key in self._streams

    async def check(self, key: Key, after: int) -> None:
        await trio.lowlevel.checkpoint()
        self._checked(key, after)

    def _checked(self, key: Key, after: int) -> _Stream:
        self._expire()
        stream = self._streams.get(key)
        if stream is None:
            raise StreamNotFound()
        if stream.final is not None and stream.final <= after:
            raise NothingMissing()
        return stream

    async def follow(self, key: Key, after: int) -> AsyncIterator[tuple[int, StreamEvent]]:
        stream = self._checked(key, after)
        sent = after
        while True:
            for position, event in stream.events:
                if position > sent:
                    sent = position
                    yield position, event
            if stream.final is not None and sent >= stream.final:
                return
            await stream.changed.wait()

    @asynccontextmanager
    async def watching(self, key: Key) -> AsyncIterator[None]:
        """Nothing to tell: every follower of this process's streams is counted by the
        generation itself."""
        await trio.lowlevel.checkpoint()
        yield

    async def watched(self, key: Key) -> bool:
        await trio.lowlevel.checkpoint()
        return False

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_seconds
        while self._ended:
            key, (ended_at, stream) = next(iter(self._ended.items()))
            if ended_at > deadline and len(self._ended) <= self.max_ended:
                break
            del self._ended[key]
            if self._streams.get(key) is stream:
                del self._streams[key]
