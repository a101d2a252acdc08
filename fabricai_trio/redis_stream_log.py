"""The stream log mirrored into Redis, so that a reconnect finds its stream on any replica.

Each stream is a Redis Stream `<prefix>events:<owner hash>:<request_id>` whose entries
are `{p: position, t: event name, d: event JSON}`, capped at RESUME_MAX_EVENTS entries
and expiring RESUME_TTL_SECONDS after its last write. Writes go through one writer task
(`run()`, in the services nursery) that sends them in order, batched in a pipeline, so a
generation never waits on Redis. A reader on this replica reads the local log (no Redis
round trip per token); a reader on another replica reads the Redis Stream, replays what
it holds after the client's position and then blocks on new entries (XREAD) until the
final event.

A resumable generation runs on while its client is away, for a grace period. A reader on
another replica keeps the key `<prefix>watch:<owner hash>:<request_id>` alive while it
follows, so the replica running the generation knows that someone still reads it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from pydantic import BaseModel
from redis.exceptions import RedisError

from .core.events import EVENT_NAMES, StreamEvent
from .core.stream_ids import is_final
from .redis_channels import RedisChannels, next_batch
from .stream_log import Key, MemoryStreamLog, NothingMissing, StreamNotFound

log = logging.getLogger(__name__)

EVENT_TYPES: dict[str, type[BaseModel]] = {name: cls for cls, name in EVENT_NAMES.items()}
WATCH_TTL_MS = 3000
WATCH_REFRESH_SECONDS = 1.0
BLOCK_MS = 500


def encode(position: int, event: StreamEvent) -> dict[str, str]:
    return {"p": str(position), "t": EVENT_NAMES[type(event)], "d": event.model_dump_json()}


def decode(fields: dict[bytes, bytes]) -> tuple[int, StreamEvent]:
    model = EVENT_TYPES[fields[b"t"].decode()]
    event: Any = model.model_validate_json(fields[b"d"])
    return int(fields[b"p"]), event


class RedisStreamLog:
    """A `stream_log.StreamLog`: this replica's `MemoryStreamLog`, mirrored to Redis."""

    def __init__(self, redis: RedisChannels, local: MemoryStreamLog, *, prefix: str) -> None:
        self.local = local
        self._redis = redis
        self._prefix = prefix
        self._writes_in, self._writes_out = trio.open_memory_channel[
            tuple[Key, int, StreamEvent, bool]
        ](math.inf)

    def _name(self, kind: str, key: Key) -> str:
        owner, request_id = key
        owner_hash = hashlib.sha256(owner.encode()).hexdigest()[:32]
        return f"{self._prefix}{kind}:{owner_hash}:{request_id}"

    def append(self, key: Key, position: int, event: StreamEvent) -> None:
        fresh = self.local.add(key, position, event)
        self._writes_in.send_nowait((key, position, event, fresh))

    async def check(self, key: Key, after: int) -> None:
        if self.local.knows(key):
            await self.local.check(key, after)
        else:
            self._checked(await self._read_all(key), after)

    async def _read_all(self, key: Key) -> list[tuple[Any, int, StreamEvent]]:
        entries: Any = await self._redis.call(self._redis.client.xrange, self._name("events", key))
        return [(entry_id, *decode(fields)) for entry_id, fields in entries or ()]

    @staticmethod
    def _checked(entries: list[tuple[Any, int, StreamEvent]], after: int) -> None:
        if not entries:
            raise StreamNotFound()
        final = next((p for _, p, e in entries if is_final(e)), None)
        if final is not None and final <= after:
            raise NothingMissing()

    async def follow(self, key: Key, after: int) -> AsyncIterator[tuple[int, StreamEvent]]:
        source = (self.local.follow(key, after) if self.local.knows(key)
                  else self._follow_redis(key, after))
        async for item in source:
            yield item

    async def _follow_redis(self, key: Key, after: int) -> AsyncIterator[tuple[int, StreamEvent]]:
        name = self._name("events", key)
        decoded = await self._read_all(key)
        self._checked(decoded, after)
        last_id: Any = b"0-0"
        while True:
            for entry_id, position, event in decoded:
                last_id = entry_id
                if position > after:
                    after = position
                    yield position, event
                if is_final(event):
                    return
            read: Any = await self._redis.call(
                self._redis.client.xread, {name: last_id}, 256, BLOCK_MS
            )
            decoded = [(entry_id, *decode(fields)) for _, rows in read or ()
                       for entry_id, fields in rows]

    @asynccontextmanager
    async def watching(self, key: Key) -> AsyncIterator[None]:
        """Tell the replica running `key` that a client follows it from here."""
        if self.local.knows(key):
            yield
            return
        name = self._name("watch", key)

        async def refresh() -> None:
            while True:
                try:
                    await self._redis.call(self._redis.client.set, name, b"1", None, WATCH_TTL_MS)
                except RedisError as exc:
                    log.warning("resume watch key not written: %s", exc)
                await trio.sleep(WATCH_REFRESH_SECONDS)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresh)
            yield
            nursery.cancel_scope.cancel()

    async def watched(self, key: Key) -> bool:
        """Whether a reader on another replica follows `key` now."""
        try:
            return bool(await self._redis.call(self._redis.client.exists,
                                               self._name("watch", key)))
        except RedisError:
            return False

    async def run(self, *, ttl_seconds: int, max_events: int,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued events to Redis in order, batched, until cancelled."""
        task_status.started()
        while True:
            batch = await next_batch(self._writes_out)
            pipe = self._redis.client.pipeline(transaction=False)
            for key, position, event, fresh in batch:
                name = self._name("events", key)
                if fresh:  # a new stream under this id replaces an ended one
                    pipe.delete(name)
                pipe.xadd(name, encode(position, event),  # type: ignore[arg-type]
                          maxlen=max_events, approximate=True)
                pipe.expire(name, ttl_seconds)
            try:
                await self._redis.call(pipe.execute)
            except RedisError as exc:
                log.warning("stream events not written to Redis: %s", exc)
