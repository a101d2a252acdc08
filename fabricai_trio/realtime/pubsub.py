"""The fan-out hook: how broadcasts reach clients connected to other server processes.

A `SocketIOServer` delivers every emit to its own clients at once and, when it has a
`PubSub`, also publishes it; each server's receive loop (run in its service nursery)
delivers what the others published. A Redis implementation would publish to a channel
and run a subscriber loop in a worker thread; `LocalPubSub` connects servers living in
one process (tests, and the reference for the semantics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import trio


@dataclass(frozen=True, kw_only=True)
class BroadcastMessage:
    """One emit, as it travels between servers (arguments must be JSON or bytes)."""

    origin: str
    """Id of the publishing server: it skips its own messages (it delivered them already)."""
    namespace: str
    event: str
    args: tuple[Any, ...]
    to: tuple[str, ...] | None
    """Rooms (a sid is a room); None = everyone in the namespace."""
    skip_sids: tuple[str, ...] = ()
    action: Literal["emit", "close_room"] = "emit"
    """`close_room`: empty the rooms in `to` (no event is sent; `event` and `args` unused)."""


class PubSub(Protocol):
    async def publish(self, message: BroadcastMessage) -> None:
        """Send `message` to every subscribed server.

        Cancellation may or may not have published it.
        """

    async def listen(
        self,
        deliver: Callable[[BroadcastMessage], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Receive loop: call `deliver` for each published message until cancelled;
        `task_status.started()` once subscribed."""


class LocalPubSub:
    """In-process fan-out between the `SocketIOServer`s sharing this object."""

    def __init__(self) -> None:
        self._subscribers: set[trio.MemorySendChannel[BroadcastMessage]] = set()

    async def publish(self, message: BroadcastMessage) -> None:
        """Queue `message` for every subscriber (never blocks: the queues are unbounded)."""
        for channel in list(self._subscribers):
            channel.send_nowait(message)
        await trio.lowlevel.checkpoint()

    async def listen(
        self,
        deliver: Callable[[BroadcastMessage], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver until cancelled; unsubscribes on the way out."""
        send, receive = trio.open_memory_channel[BroadcastMessage](math.inf)
        self._subscribers.add(send)
        try:
            task_status.started()
            async for message in receive:
                deliver(message)
        finally:
            self._subscribers.discard(send)
