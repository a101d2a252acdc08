"""Redis fan-out for `SocketIOServer` broadcasts across processes.

redis-py has no trio support, so its blocking client runs in worker threads under a
dedicated `CapacityLimiter` (DESIGN §3). Threads are never abandoned: the receive loop
polls with a short timeout, so a cancellation takes effect within `poll_interval_s`.
Fan-out is best effort: local clients already have the message when it is published,
so a Redis outage is logged and retried, never raised into `emit()`.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any

import redis
import trio

from .pubsub import BroadcastMessage

logger = logging.getLogger("fabricai_trio.realtime")

_BYTES_TAG = "\x00bytes"


def _encode_value(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {_BYTES_TAG: base64.b64encode(value).decode()}
    if isinstance(value, (list, tuple)):
        return [_encode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode_value(v) for k, v in value.items()}
    return value


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and _BYTES_TAG in value:
            return base64.b64decode(value[_BYTES_TAG])
        return {k: _decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    return value


def encode_message(message: BroadcastMessage) -> bytes:
    """A broadcast as JSON (bytes arguments tagged and base64-encoded)."""
    return json.dumps(
        {
            "origin": message.origin,
            "namespace": message.namespace,
            "event": message.event,
            "args": _encode_value(list(message.args)),
            "to": list(message.to) if message.to is not None else None,
            "skip_sids": list(message.skip_sids),
        },
        separators=(",", ":"),
    ).encode()


def decode_message(raw: bytes | str) -> BroadcastMessage:
    """The inverse of `encode_message`; raises ValueError/KeyError/TypeError if malformed."""
    data = json.loads(raw)
    return BroadcastMessage(
        origin=str(data["origin"]),
        namespace=str(data["namespace"]),
        event=str(data["event"]),
        args=tuple(_decode_value(data["args"])),
        to=tuple(data["to"]) if data["to"] is not None else None,
        skip_sids=tuple(data["skip_sids"]),
    )


class RedisPubSub:
    """A `PubSub` over one Redis channel."""

    def __init__(
        self,
        url: str,
        *,
        channel: str = "fabricai:socketio",
        poll_interval_s: float = 0.2,
        retry_interval_s: float = 1.0,
        max_threads: int = 4,
    ) -> None:
        self.channel = channel
        self.poll_interval_s = poll_interval_s
        self.retry_interval_s = retry_interval_s
        self._client: redis.Redis = redis.Redis.from_url(url)
        self._limiter = trio.CapacityLimiter(max_threads)

    async def publish(self, message: BroadcastMessage) -> None:
        """Publish in a worker thread; a Redis error is logged, not raised.

        Cancellation waits for the thread's call to finish (it is short), then raises.
        """
        payload = encode_message(message)
        try:
            await trio.to_thread.run_sync(
                self._client.publish, self.channel, payload, limiter=self._limiter
            )
        except redis.RedisError as exc:
            logger.warning("Socket.IO fan-out: publish to Redis failed: %s", exc)

    async def listen(
        self,
        deliver: Callable[[BroadcastMessage], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe and deliver until cancelled; resubscribes after a Redis outage.

        `started()` is called at once (before the first subscription succeeds) so that a
        Redis outage never blocks the server from starting. Cancellation takes effect
        within `poll_interval_s` (the polling thread finishes its wait first).
        """
        task_status.started()
        while True:
            try:
                await self._listen_once(deliver)
            except redis.RedisError as exc:
                logger.warning("Socket.IO fan-out: Redis subscription lost: %s", exc)
            await trio.sleep(self.retry_interval_s)

    async def _listen_once(self, deliver: Callable[[BroadcastMessage], None]) -> None:
        pubsub: Any = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            await trio.to_thread.run_sync(pubsub.subscribe, self.channel, limiter=self._limiter)
            while True:
                raw = await trio.to_thread.run_sync(
                    pubsub.get_message, True, self.poll_interval_s, limiter=self._limiter
                )
                if raw is None or raw.get("type") != "message":
                    continue
                try:
                    message = decode_message(raw["data"])
                except (ValueError, KeyError, TypeError):
                    logger.warning("Socket.IO fan-out: malformed message ignored")
                    continue
                deliver(message)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(pubsub.close, limiter=self._limiter)

    async def aclose(self) -> None:
        """Close the connection pool (in a thread). Cancellation waits for it."""
        await trio.to_thread.run_sync(self._client.close, limiter=self._limiter)
