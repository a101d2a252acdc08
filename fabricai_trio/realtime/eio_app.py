"""The trio side of Engine.IO: an ASGI app that moves bytes between clients and sessions.

Protocol decisions are sans-IO: `eio_request.route()` decides what a request is (and
builds every HTTP answer), `EngineIOSession` decides what it means for the session. This
module only reads requests, waits and writes; each session's timers and task live in
`eio_socket`. Task ownership:

- `EngineIOApp.run()` (started by the application's lifespan nursery) owns the *service
  nursery*. Each polling session runs its session task (`EngineIOSocket._run`, which owns
  the session nursery) there.
- A websocket-only session runs its session task in the websocket request's own nursery.
- A held polling GET, a POST and the websocket reader/writer are tasks of their request.
"""

from __future__ import annotations

import logging

import trio

from .asgi import (
    Message,
    Receive,
    Scope,
    Send,
    deny_websocket,
    parse_request,
    send_response,
)
from .config import RealtimeConfig
from .eio_request import (
    AttachWebsocket,
    Decision,
    Handshake,
    Headers,
    Poll,
    Post,
    Preflight,
    Refuse,
    error_response,
    ok,
    route,
)
from .eio_session import CloseReason, EngineIOSession, Transport
from .eio_socket import EngineIOSocket, SessionHandler, new_sid
from .errors import (
    WS_NORMAL_CLOSURE,
    ProtocolError,
    RemoteProtocolError,
    ws_close_code_for,
)
from .tasks import Signal

logger = logging.getLogger("fabricai_trio.realtime")

#: Packets of a polling POST decoded and delivered between two checkpoints.
POST_BATCH = 64


class EngineIOApp:
    """Engine.IO v4 server as an ASGI app (`http` and `websocket` scopes).

    Start `run()` in a long-lived nursery before serving polling clients; call
    `shutdown()` to send CLOSE to everyone and let `run()` return.
    """

    def __init__(self, handler: SessionHandler, config: RealtimeConfig) -> None:
        self.handler = handler
        self.config = config
        self._sessions: dict[str, EngineIOSocket] = {}
        self._sessions_changed = Signal()
        self._service_nursery: trio.Nursery | None = None
        self._accepting = True
        self._stopped = trio.Event()

    # --- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the service nursery (polling sessions) until `shutdown()` completes.

        Cancelled from outside: every polling session is failed and its `session_ended`
        runs shielded (bounded), then this returns by raising `Cancelled`.
        """
        async with trio.open_nursery() as nursery:
            self._service_nursery = nursery
            task_status.started()
            try:
                await self._stopped.wait()
            finally:
                self._service_nursery = None
            nursery.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Stop accepting sessions, send CLOSE to every client, wait for them to go
        (at most `shutdown_timeout_ms`), drop the rest, and let `run()` return.

        Cancellation stops the waiting; the remaining sessions are then dropped.
        """
        self._accepting = False
        now = trio.current_time()
        for socket in list(self._sessions.values()):
            socket._core.close(now, CloseReason.SERVER_SHUTDOWN)
            socket._after_core()
        try:
            with trio.move_on_after(self.config.shutdown_timeout_s):
                while self._sessions:
                    await self._sessions_changed.wait()
        finally:
            for socket in list(self._sessions.values()):
                socket._core.fail(CloseReason.SERVER_SHUTDOWN)
                socket._after_core()
            self._stopped.set()

    def _forget(self, socket: EngineIOSocket) -> None:
        if self._sessions.get(socket.sid) is socket:
            del self._sessions[socket.sid]
            self._sessions_changed.fire()

    # --- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request or websocket.

        Cancelled (the server dropping the connection): a held GET or a websocket is
        treated as a client that went away; a session's own tasks are not affected.
        """
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            raise RuntimeError(f"EngineIOApp cannot serve {scope['type']!r} scopes")

    def _route(self, scope: Scope) -> Decision:
        accepting = (
            self._accepting
            and len(self._sessions) < self.config.max_sessions
            and (scope["type"] == "websocket" or self._service_nursery is not None)
        )
        return route(
            parse_request(scope),
            self.config,
            session_exists=self._sessions.__contains__,
            accepting=accepting,
        )

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        decision = self._route(scope)
        if isinstance(decision, (Refuse, Preflight)):
            await send_response(receive, send, decision.response)
            return
        assert isinstance(decision, (Handshake, Poll, Post)), decision
        try:
            if isinstance(decision, Handshake):
                await self._handshake(scope, receive, send, decision.cors)
            elif isinstance(decision, Poll):
                await self._poll(self._sessions[decision.sid], receive, send, decision.cors)
            else:
                await self._post(self._sessions[decision.sid], receive, send, decision)
        except ProtocolError as exc:
            await send_response(receive, send, error_response(exc, decision.cors))

    async def _handshake(self, scope: Scope, receive: Receive, send: Send, cors: Headers) -> None:
        """A new polling session: its task starts in the service nursery, then the OPEN
        packet is the answer."""
        nursery = self._service_nursery
        assert nursery is not None, "route() answers 503 without a service nursery"
        now = trio.current_time()
        core = EngineIOSession(sid=new_sid(), transport=Transport.POLLING, config=self.config)
        socket = EngineIOSocket(core, dict(scope), config=self.config, forget=self._forget)
        open_packet = core.handshake(now)
        self._sessions[core.sid] = socket
        await nursery.start(socket._run, self.handler)
        await send_response(receive, send, ok(cors, open_packet))

    async def _poll(
        self, socket: EngineIOSocket, receive: Receive, send: Send, cors: Headers
    ) -> None:
        """A polling GET: held until the session has something to say.

        The request's receive() is watched concurrently: a client that goes away while
        its GET is held ends the session (hypercorn only reports the disconnect to an app
        that keeps receiving).
        """
        core = socket._core
        try:
            core.begin_get(trio.current_time())
        finally:
            socket._after_core()
        answer: str | None = None
        disconnected = False
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                nonlocal disconnected
                while (await receive())["type"] != "http.disconnect":
                    pass
                disconnected = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            while (answer := core.poll_response(trio.current_time())) is None:
                await socket._output.wait()
            socket._after_core()
            nursery.cancel_scope.cancel()
        if disconnected or answer is None:
            core.abandon_get(trio.current_time())
            socket._after_core()
            return
        await send_response(receive, send, ok(cors, answer))
        core.output_written(trio.current_time())
        socket._after_core()

    async def _post(self, socket: EngineIOSocket, receive: Receive, send: Send, post: Post) -> None:
        """A polling POST: body chunks go to the session as they come (it answers 413 the
        moment the body grows past maxPayload), then its packets; the answer is `ok`."""
        core = socket._core
        try:
            core.begin_post(trio.current_time(), post.content_length)
        finally:
            socket._after_core()
        try:
            with trio.move_on_after(self.config.body_timeout_s) as timer:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    core.receive_post_data(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
            if timer.cancelled_caught:
                raise core.post_timed_out()
            done = core.end_of_post(trio.current_time(), batch=POST_BATCH)
            await socket._after_input()
            while not done:  # a large payload: let other tasks run between batches
                done = core.continue_post(trio.current_time(), batch=POST_BATCH)
                await socket._after_input()
                await trio.lowlevel.checkpoint()
        finally:
            core.end_post()
            socket._after_core()
        await send_response(receive, send, ok(post.cors, "ok"))

    # --- websocket ---------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A websocket: a new session (its task then lives in this request's nursery) or
        an upgrade probe of a polling session. What `route()` refuses is refused before
        the upgrade; what the session refuses (a second websocket) is closed once
        accepted, as the reference server does."""
        connect = await receive()
        if connect["type"] != "websocket.connect":
            return
        decision = self._route(scope)
        if isinstance(decision, Refuse) and not decision.accept_first:
            code = ws_close_code_for(decision.error)
            await deny_websocket(scope, send, decision.response, code)
            return
        # the session, taken before the first checkpoint (route() saw it live)
        existing = self._sessions[decision.sid] if isinstance(decision, AttachWebsocket) else None
        await send({"type": "websocket.accept"})
        if isinstance(decision, Refuse):
            await send({"type": "websocket.close", "code": ws_close_code_for(decision.error)})
            return
        now = trio.current_time()
        if existing is not None:
            try:
                token = existing._core.attach_websocket(now)
            except RemoteProtocolError as exc:
                await send({"type": "websocket.close", "code": ws_close_code_for(exc)})
                return
            await self._pump_websocket(existing, token, receive, send)
            return
        assert isinstance(decision, Handshake), decision
        core = EngineIOSession(sid=new_sid(), transport=Transport.WEBSOCKET, config=self.config)
        socket = EngineIOSocket(core, dict(scope), config=self.config, forget=self._forget)
        token = core.attach_websocket(now)
        await send({"type": "websocket.send", "text": core.handshake(now)})
        self._sessions[socket.sid] = socket
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(socket._run, self.handler)
                await self._pump_websocket(socket, token, receive, send)
        finally:
            self._forget(socket)

    async def _pump_websocket(
        self, socket: EngineIOSocket, token: int, receive: Receive, send: Send
    ) -> None:
        """Move frames until this websocket is no longer the session's (closed, failed,
        or a dropped probe). Cancellation detaches it from the session."""
        core = socket._core
        state = _WsState()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ws_reader, socket, token, receive, state)
                await self._ws_writer(socket, token, send, state)
                nursery.cancel_scope.cancel()
        finally:
            core.websocket_closed(token, trio.current_time())
            socket._after_core()

    async def _ws_reader(
        self, socket: EngineIOSocket, token: int, receive: Receive, state: _WsState
    ) -> None:
        """Frames into the session, with backpressure; cancelled by `_pump_websocket`."""
        core = socket._core
        while core.ws_active(token):
            message = await receive()
            if message["type"] == "websocket.disconnect":
                state.client_gone = True
                core.websocket_closed(token, trio.current_time())
                socket._after_core()
                return
            if message["type"] != "websocket.receive":
                continue
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            try:
                core.receive_ws_message(token, data, trio.current_time())
            except RemoteProtocolError as exc:
                # the session already dropped this websocket (a probe) or ended
                state.close_code = ws_close_code_for(exc)
                socket._after_core()
                return
            await socket._after_input()

    async def _ws_writer(
        self, socket: EngineIOSocket, token: int, send: Send, state: _WsState
    ) -> None:
        """Session output onto the websocket, then the close. Frames taken from the core
        are lost if cancelled mid-write (the websocket is going away then anyway)."""
        core = socket._core
        while True:
            frames = core.take_ws_output(token)
            if frames:
                socket._after_core()
                for frame in frames:
                    key = "text" if isinstance(frame, str) else "bytes"
                    if not await _ws_send(send, {"type": "websocket.send", key: frame}, state):
                        return
                core.output_written(trio.current_time())
                socket._after_core()
                # Output queued while we were writing fired the signal with nobody
                # waiting: look again before waiting.
                continue
            if not core.ws_active(token):
                await _ws_send(send, {"type": "websocket.close", "code": state.close_code}, state)
                return
            await socket._output.wait()


async def _ws_send(send: Send, message: Message, state: _WsState) -> bool:
    """Send one websocket message; False once the client is known to be gone.

    A client that closes while we write can make the server raise here (Hypercorn's trio
    worker may even report `BusyResourceError` when its own close races our write); the
    connection is over either way, so the error ends this websocket quietly.
    """
    if state.client_gone:
        return False
    try:
        await send(message)
    except Exception as exc:
        logger.debug("websocket write failed, client gone: %r", exc)
        state.client_gone = True
        return False
    return True


class _WsState:
    """What the reader tells the writer about one websocket."""

    def __init__(self) -> None:
        self.client_gone = False
        self.close_code = WS_NORMAL_CLOSURE


__all__ = ["EngineIOApp"]
