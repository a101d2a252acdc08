"""Redis pub/sub and plain commands for the app's cross-replica features.

One `RedisChannels` per app holds one redis-py connection pool; Socket.IO's fan-out
(realtime/redis_pubsub.py) and the cross-replica cancel (remote_cancel.py) use it. The
app's services nursery owns it: it is closed (`aclose()`) only after every task that
uses it has ended.

redis-py has no trio support, so its blocking client runs in worker threads under a
dedicated `CapacityLimiter` (DESIGN §3). Threads are never abandoned: a subscriber
polls with a short timeout, so a cancellation takes effect within `poll_interval_s`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import trio

log = logging.getLogger(__name__)

T = TypeVar("T")


async def next_batch(receiver: trio.MemoryReceiveChannel[T]) -> list[T]:
    """Wait for one item, then take every item already queued behind it: the writes a
    writer task sends to Redis in one pipeline (one round trip). Cancellation loses
    nothing: it only interrupts the wait for the first item."""
    batch = [await receiver.receive()]
    while True:
        try:
            batch.append(receiver.receive_nowait())
        except trio.WouldBlock:
            return batch


class RedisChannels:
    def __init__(
        self,
        url: str,
        *,
        poll_interval_s: float = 0.2,
        retry_interval_s: float = 1.0,
        max_threads: int = 4,
        timeout_s: float = 5.0,
    ) -> None:
        self.poll_interval_s = poll_interval_s
        self.retry_interval_s = retry_interval_s
        # Our own timeouts, not redis-py's defaults (no socket timeout: a paused Redis
        # held a worker thread, and what waited on it, for ever). `timeout_s` must stay
        # above the stream log's XREAD block time.
        self.client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 2.0),
            health_check_interval=30,
        )
        self._limiter = trio.CapacityLimiter(max_threads)

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run one blocking redis-py call in a worker thread; raises `redis.RedisError`.

        Cancellation waits for the call to finish (it is short), then raises."""
        return await trio.to_thread.run_sync(function, *args, limiter=self._limiter)

    async def publish(self, channel: str, payload: bytes) -> int:
        """Publish; the number of subscribers that got it. Raises `redis.RedisError`."""
        receivers: int = await self.call(self.client.publish, channel, payload)
        return receivers

    async def publish_many(self, channel: str, payloads: list[bytes]) -> None:
        """Publish several messages in one round trip (a pipeline). Raises
        `redis.RedisError`, e.g. a timeout when Redis does not answer in time."""

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            for payload in payloads:
                pipe.publish(channel, payload)
            pipe.execute()

        await self.call(run)

    async def listen(
        self,
        channel: str,
        deliver: Callable[[bytes], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe to `channel` and deliver each message until cancelled;
        resubscribes after a Redis outage.

        `started()` is called once the first subscription is made or has failed, so a
        caller can publish to itself right after `start()`, and a Redis outage never
        blocks start-up. Cancellation takes effect within `poll_interval_s`.
        """
        started = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                await self._listen_once(channel, deliver, mark_started)
            except redis.RedisError as exc:
                log.warning("Redis subscription to %s lost: %s", channel, exc)
            mark_started()
            await trio.sleep(self.retry_interval_s)

    async def _listen_once(
        self, channel: str, deliver: Callable[[bytes], None], subscribed: Callable[[], None]
    ) -> None:
        pubsub: Any = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            await self.call(pubsub.subscribe, channel)
            subscribed()
            while True:
                raw = await self.call(pubsub.get_message, True, self.poll_interval_s)
                if raw is not None and raw.get("type") == "message":
                    deliver(raw["data"])
        finally:
            with trio.CancelScope(shield=True):
                await self.call(pubsub.close)

    async def aclose(self) -> None:
        """Close the connection pool (in a thread). Cancellation waits for it."""
        await self.call(self.client.close)
