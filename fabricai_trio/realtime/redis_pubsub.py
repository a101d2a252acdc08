"""Redis fan-out for `SocketIOServer` broadcasts across processes.

The Redis connection and its worker threads are the app's `RedisChannels`. Fan-out is
best effort: local clients already have the message when it is published, so a Redis
outage is logged and retried, never raised into `emit()`. `emit()` never waits on Redis
either: `publish()` only queues (a bounded queue; a full one drops the message and
counts it), and a publisher task (run beside the subscriber in `listen()`) sends what
is queued in one pipeline per batch. With Redis paused a stream goes on at full speed;
only the other replicas' copies are lost.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any, Literal

import trio
from redis.exceptions import RedisError

from ..redis_channels import RedisChannels, next_batch
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
            "action": message.action,
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
        action=_action(data.get("action", "emit")),
    )


def _action(value: Any) -> Literal["emit", "close_room"]:
    if value == "emit" or value == "close_room":
        return value  # type: ignore[no-any-return]
    raise ValueError(f"unknown fan-out action {value!r}")


class RedisPubSub:
    """A `PubSub` over one Redis channel of the app's `RedisChannels` (which the app
    owns and closes)."""

    def __init__(
        self, redis: RedisChannels, *, channel: str = "fabricai:socketio",
        queue_size: int = 1024,
    ) -> None:
        self.channel = channel
        self._redis = redis
        self._outgoing, self._queued = trio.open_memory_channel[bytes](queue_size)
        #: Messages not published: the queue was full, or Redis failed them.
        self.dropped = 0

    async def publish(self, message: BroadcastMessage) -> None:
        """Queue `message` for the publisher task; never waits on Redis. A full queue
        (Redis slow or down) drops it: logged, counted in `dropped`."""
        try:
            self._outgoing.send_nowait(encode_message(message))
        except trio.WouldBlock:
            self._drop(1, "the publish queue is full (Redis is slow or down)")
        await trio.lowlevel.checkpoint()

    def _drop(self, count: int, why: str) -> None:
        if self.dropped == 0 or (self.dropped + count) // 1000 > self.dropped // 1000:
            logger.warning("Socket.IO fan-out: %d message(s) dropped so far: %s",
                           self.dropped + count, why)
        self.dropped += count

    async def _publish_queued(self) -> None:
        """Send what is queued, one pipeline per batch, until cancelled; each call is
        bounded by the client's socket timeout (`RedisChannels`)."""
        while True:
            batch = await next_batch(self._queued)
            try:
                await self._redis.publish_many(self.channel, batch)
            except RedisError as exc:
                self._drop(len(batch), f"publish to Redis failed: {exc}")

    async def listen(
        self,
        deliver: Callable[[BroadcastMessage], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver what other servers publish until cancelled (see `RedisChannels.listen`)."""

        def on_message(raw: bytes) -> None:
            try:
                message = decode_message(raw)
            except (ValueError, KeyError, TypeError):
                logger.warning("Socket.IO fan-out: malformed message ignored")
                return
            deliver(message)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publish_queued)
            await self._redis.listen(self.channel, on_message, task_status=task_status)
