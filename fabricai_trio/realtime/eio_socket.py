"""A live Engine.IO session on trio: the application's side of it, and its session task.

`EngineIOSocket` wraps a sans-IO `EngineIOSession`: the application receives and sends
messages and spawns tasks through it; the transport (`eio_app`) feeds it and drains it
through the underscored hooks. Its session task (`_run`) owns the *session nursery*: the
heartbeat (the session's timers), the application's `run_session()` and every task it
`spawn`s. When the session ends that nursery is cancelled, so a disconnect cancels all
of the client's work; then `session_ended` runs, shielded and time-limited.
"""

from __future__ import annotations

import collections
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from .asgi import Scope
from .config import RealtimeConfig
from .eio_session import CloseReason, EngineIOSession, MessageReceived, SessionClosed, Upgraded
from .tasks import Signal, run_logged, spawn_logged

logger = logging.getLogger("fabricai_trio.realtime")


class SessionEnded(Exception):
    """The session is over: `EngineIOSocket.receive()` has nothing more to give."""


class SessionHandler(Protocol):
    """What runs on top of Engine.IO (the Socket.IO layer, or an echo for tests)."""

    async def run_session(self, socket: EngineIOSocket) -> None:
        """Serve one session; runs inside the session nursery and is cancelled when the
        session ends. Returning closes the session gracefully."""

    async def session_ended(self, socket: EngineIOSocket, reason: CloseReason) -> None:
        """Called once after the session nursery is gone, shielded, with a time limit."""


def new_sid() -> str:
    """A fresh, URL-safe, unguessable session id."""
    return secrets.token_urlsafe(15)


class EngineIOSocket:
    """One live session as the application sees it (plus the transport's private hooks).

    Application API: `sid`, `scope`, `receive()`, `send()`, `close()`, `spawn()`,
    `close_reason`. Everything with a leading underscore belongs to `EngineIOApp`.
    `forget` is called once the session is over, before `session_ended` runs.
    """

    def __init__(
        self,
        core: EngineIOSession,
        scope: Scope,
        *,
        config: RealtimeConfig,
        forget: Callable[[EngineIOSocket], None],
    ) -> None:
        self._core = core
        self._config = config
        self._forget = forget
        self.scope = scope
        self._inbound: collections.deque[str | bytes] = collections.deque()
        self._inbound_bytes = 0
        self._output = Signal()  # core output or state may have changed
        self._input = Signal()  # a message arrived or the session closed
        self._drained = Signal()  # the application took a message
        self._timers = Signal()  # the next deadline moved
        self._deadline: float | None = None
        self._closed = trio.Event()
        self._nursery: trio.Nursery | None = None

    # --- application API ---------------------------------------------------------------

    @property
    def sid(self) -> str:
        return self._core.sid

    @property
    def close_reason(self) -> CloseReason | None:
        return self._core.close_reason

    async def receive(self) -> str | bytes:
        """The next message from the client, in order.

        Raises `SessionEnded` once the session is over and every message was taken.
        Cancellation loses nothing: an untaken message stays queued.
        """
        while True:
            if self._inbound:
                await trio.lowlevel.checkpoint_if_cancelled()
                data = self._inbound.popleft()
                self._inbound_bytes -= len(data)
                self._drained.fire()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            if self._closed.is_set():
                raise SessionEnded(self.close_reason)
            await self._input.wait()

    def send(self, data: str | bytes) -> bool:
        """Queue a message for the client; False if the session is no longer open.

        Never blocks: a client that falls too far behind is disconnected instead
        (`CloseReason.BUFFER_OVERFLOW`, see `eio_session`).
        """
        if not self._core.is_open:
            return False
        self._core.send(data, trio.current_time())
        self._after_core()
        return True

    def close(self, reason: CloseReason = CloseReason.SERVER_CLOSE) -> None:
        """Close gracefully: what is queued is delivered, then CLOSE."""
        self._core.close(trio.current_time(), reason)
        self._after_core()

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any, what: str = "task") -> None:
        """Run `fn(*args)` in the session nursery: cancelled when the session ends,
        errors logged. Raises `RuntimeError` once the session is over."""
        if self._nursery is None or self._closed.is_set():
            raise RuntimeError("session is not running")
        spawn_logged(self._nursery, fn, *args, what=what)

    # --- transport hooks ---------------------------------------------------------------

    def _after_core(self) -> None:
        """Collect what the core reported and wake whoever waits on it."""
        while (event := self._core.next_event()) is not None:
            if isinstance(event, MessageReceived):
                self._inbound.append(event.data)
                self._inbound_bytes += len(event.data)
                self._input.fire()
            elif isinstance(event, SessionClosed):
                self._closed.set()
                self._input.fire()
                self._drained.fire()
                logger.debug("session %s closed: %s", self.sid, event.reason)
            elif isinstance(event, Upgraded):
                logger.debug("session %s upgraded to websocket", self.sid)
        self._output.fire()
        deadline = self._core.next_deadline()
        if deadline != self._deadline:
            self._deadline = deadline
            self._timers.fire()

    async def _after_input(self) -> None:
        """`_after_core()`, then wait while the application is too far behind (this is
        the backpressure that stops a POST answer or the websocket reader)."""
        self._after_core()
        while (
            len(self._inbound) > self._config.max_inbound_backlog
            or self._inbound_bytes > self._config.max_inbound_bytes
        ):
            if self._closed.is_set():
                return
            await self._drained.wait()

    async def _heartbeat(self) -> None:
        """Drive the core's timers (pings, timeouts). Runs until cancelled."""
        while True:
            deadline = self._core.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._timers.wait()
            self._core.tick(trio.current_time())
            self._after_core()

    async def _run(
        self,
        handler: SessionHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The session task: owns the session nursery until the session ends.

        If cancelled from outside (the server stopping hard) the session is failed, and
        `session_ended` still runs, shielded for at most `disconnect_handler_timeout_ms`.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._heartbeat, name=f"eio-heartbeat-{self.sid}")
                nursery.start_soon(self._serve, handler, name=f"eio-session-{self.sid}")
                task_status.started()
                await self._closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            if not self._closed.is_set():
                self._core.fail(CloseReason.SERVER_SHUTDOWN)
                self._after_core()
            self._forget(self)
            timeout = self._config.disconnect_handler_timeout_s
            with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout):
                reason = self.close_reason or CloseReason.SERVER_CLOSE
                await run_logged(handler.session_ended, self, reason, what="session_ended")

    async def _serve(self, handler: SessionHandler) -> None:
        """The application's `run_session`; cancelled with the session nursery."""
        try:
            await run_logged(handler.run_session, self, what="run_session")
        finally:
            if self._core.is_open:
                self.close()


__all__ = ["EngineIOSocket", "SessionEnded", "SessionHandler", "new_sid"]
