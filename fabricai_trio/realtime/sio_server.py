"""Socket.IO v5 server on trio, on top of `EngineIOApp`.

Usage::

    server = SocketIOServer(RealtimeConfig.from_settings(settings))

    @server.on("connect")
    async def connect(sid: str, auth: dict[str, Any] | None, scope: Scope) -> None:
        if not valid(auth):
            raise ConnectionRefused("unauthorized", {"code": 401})

    @server.on("inference_prompt")
    async def prompt(sid: str, payload: dict[str, Any]) -> dict[str, Any]:
        scope = server.start_task(sid, generate, sid, payload)  # cancelled on disconnect
        return {"request_id": ...}  # sent as the ACK if the client asked for one

    asgi = PrefixDispatcher({"/socket.io/": server.asgi_app}, fallback=quart_app.asgi_app)
    await lifespan_nursery.start(server.run)        # then `await server.shutdown()`

Task ownership: each client (Engine.IO session) has a session nursery. The connect
handler runs in the client's reader task there (so later packets wait for it), every
event handler and every `start_task()` runs as its own task there, tied to the
namespace connection: a namespace DISCONNECT cancels that connection's tasks, the end of
the session cancels all of them. Disconnect handlers run after that, never cancelled
by it (bounded by `disconnect_handler_timeout_ms`).

Rooms, sids and ack ids are kept by `socketio.base_manager.BaseManager`.
"""

from __future__ import annotations

import enum
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
from socketio.base_manager import BaseManager

from .asgi import Scope
from .config import RealtimeConfig
from .eio_app import EngineIOApp
from .eio_session import CloseReason
from .eio_socket import EngineIOSocket, SessionEnded, new_sid
from .errors import ClientGone, ConnectionRefused, RemoteProtocolError
from .pubsub import BroadcastMessage, PubSub
from .sio_protocol import (
    BINARY_EVENT,
    CONNECT,
    DEFAULT_NAMESPACE,
    EVENT,
    AckReceived,
    ConnectRequested,
    DisconnectRequested,
    EventReceived,
    Messages,
    PacketRejected,
    SioEvent,
    SocketIOParser,
    encode_ack,
    encode_connect,
    encode_connect_error,
    encode_disconnect,
    encode_event,
)
from .tasks import run_logged

logger = logging.getLogger("fabricai_trio.realtime")

ConnectHandler = Callable[[str, dict[str, Any] | None, Scope], Awaitable[None]]
#: `(sid, event, args) -> ACK result` for an event refused because its connection has
#: too many in flight (`RealtimeConfig.max_inflight_events` / `max_inflight_bytes`).
BusyHandler = Callable[[str, str, list[Any]], Awaitable[Any]]
DisconnectHandler = Callable[[str, "DisconnectReason"], Awaitable[None]]
#: The pseudo-event of a packet whose JSON `core.jsonparse` refused: `(sid, reason)`.
PACKET_REJECTED = "packet_rejected"
EventHandler = Callable[..., Awaitable[Any]]
H = TypeVar("H", bound=Callable[..., Awaitable[Any]])

__all__ = [
    "ClientGone",
    "ConnectionRefused",
    "DisconnectReason",
    "SocketIOServer",
]


class DisconnectReason(enum.StrEnum):
    """Why a client left a namespace (given to disconnect handlers)."""

    CLIENT_NAMESPACE_DISCONNECT = "client namespace disconnect"
    SERVER_NAMESPACE_DISCONNECT = "server namespace disconnect"
    CLIENT_CLOSE = CloseReason.CLIENT_CLOSE.value
    TRANSPORT_CLOSE = CloseReason.TRANSPORT_CLOSE.value
    TRANSPORT_ERROR = CloseReason.TRANSPORT_ERROR.value
    PARSE_ERROR = CloseReason.PARSE_ERROR.value
    PING_TIMEOUT = CloseReason.PING_TIMEOUT.value
    BUFFER_OVERFLOW = CloseReason.BUFFER_OVERFLOW.value
    SLOW_CLIENT = CloseReason.SLOW_CLIENT.value
    SERVER_CLOSE = CloseReason.SERVER_CLOSE.value
    SERVER_SHUTDOWN = CloseReason.SERVER_SHUTDOWN.value


@dataclass(eq=False)
class _Connection:
    """One client connected to one namespace (its own sid)."""

    sid: str
    namespace: str
    client: _Client
    pending: bool = True  # the connect handler has not finished yet
    early: Messages = field(default_factory=list)  # sent during the connect handler
    tasks: set[trio.CancelScope] = field(default_factory=set)
    data: dict[str, Any] = field(default_factory=dict)
    inflight_events: int = 0  # event handlers running
    inflight_bytes: int = 0  # the size of their events


@dataclass(eq=False)
class _Client:
    """One Engine.IO session and the namespaces it joined."""

    socket: EngineIOSocket
    parser: SocketIOParser
    connections: dict[str, _Connection] = field(default_factory=dict)
    ever_connected: bool = False
    # disconnect handlers of namespaces left after the session nursery closed
    departed: list[tuple[DisconnectHandler, str, DisconnectReason]] = field(default_factory=list)


class _PendingAck:
    """A server→client event waiting for its ACK."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.args: list[Any] | None = None

    def resolve(self, args: list[Any] | None) -> None:
        self.args = args
        self.done.set()


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


def _ack_args(result: Any) -> list[Any]:
    """A handler's return value as ACK arguments: None → [], tuple → its items."""
    if result is None:
        return []
    if isinstance(result, tuple):
        return list(result)
    return [result]


class SocketIOServer:
    """Socket.IO v5 over our trio Engine.IO server (see the module docstring)."""

    def __init__(self, config: RealtimeConfig, *, pubsub: PubSub | None = None) -> None:
        self.config = config
        self.server_id = secrets.token_hex(8)
        self._eio = EngineIOApp(self, config)
        self._pubsub = pubsub
        self._manager: Any = BaseManager()
        self._clients: dict[str, _Client] = {}
        self._connections: dict[str, _Connection] = {}
        self._namespaces: set[str] = {DEFAULT_NAMESPACE}
        self._connect_handlers: dict[str, ConnectHandler] = {}
        self._disconnect_handlers: dict[str, DisconnectHandler] = {}
        self._event_handlers: dict[tuple[str, str], EventHandler] = {}
        self._rejection_handlers: dict[str, EventHandler] = {}
        self._busy_handler: BusyHandler | None = None
        self._unconnected = 0  # clients that have not connected to a namespace yet

    # --- wiring ------------------------------------------------------------------------

    @property
    def asgi_app(self) -> EngineIOApp:
        """The ASGI callable to mount under `config.path` (http and websocket scopes)."""
        return self._eio

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the service nursery (polling sessions, the pub/sub receive loop) until
        `shutdown()` completes. Start it with `await nursery.start(server.run)`.

        Cancelled from outside: sessions are dropped, their disconnect handlers still run
        (shielded, bounded), then `Cancelled` propagates.
        """
        async with trio.open_nursery() as nursery:
            if self._pubsub is not None:
                await nursery.start(self._pubsub.listen, self._deliver_remote)
            await self._eio.run(task_status=task_status)
            nursery.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Send CLOSE to every client, wait (bounded) for them to go, end `run()`.

        Cancellation stops the waiting; the remaining clients are dropped.
        """
        await self._eio.shutdown()

    def register_namespace(self, namespace: str) -> None:
        """Accept connections to `namespace` even without handlers for it."""
        if not namespace.startswith("/"):
            raise ValueError("a namespace starts with '/'")
        self._namespaces.add(namespace)

    def on(self, event: str, namespace: str = DEFAULT_NAMESPACE) -> Callable[[H], H]:
        """Register an async handler (decorator).

        - `"connect"`: `(sid, auth, scope) -> None`; raise `ConnectionRefused(message,
          data)` to refuse (the client gets CONNECT_ERROR `{message, data}`).
        - `"disconnect"`: `(sid, reason: DisconnectReason) -> None`.
        - `PACKET_REJECTED`: `(sid, reason: str) -> result`, for an EVENT whose payload
          is beyond the JSON bounds; the result is the ACK (without a handler the ACK is
          `{"error": reason}`). The session goes on either way.
        - any other name: `(sid, *args) -> result`; the result is the ACK when the client
          asked for one (None → no arguments, a tuple → several). Each call is a task in
          the client's session nursery: it is cancelled if the client disconnects.
        """
        self.register_namespace(namespace)

        def decorator(handler: H) -> H:
            if not _is_async(handler):
                raise TypeError(f"handler for {event!r} must be an async function")
            if event == "connect":
                self._connect_handlers[namespace] = handler
            elif event == "disconnect":
                self._disconnect_handlers[namespace] = handler
            elif event == PACKET_REJECTED:
                self._rejection_handlers[namespace] = handler
            else:
                self._event_handlers[(namespace, event)] = handler
            return handler

        return decorator

    def on_busy(self, handler: BusyHandler) -> BusyHandler:
        """Register what answers an event refused because its connection already has
        `max_inflight_events` handlers (or `max_inflight_bytes` of events) running: it
        runs in the client's reader, must not wait long, and its result is the ACK.
        Without one, a refused event gets an ACK with no arguments."""
        self._busy_handler = handler
        return handler

    def close_reason_of(self, sid: str, namespace: str = DEFAULT_NAMESPACE
                        ) -> Callable[[], CloseReason | None]:
        """A function telling why the client's session ended (None while it lasts);
        it keeps working after the client is gone. Raises `ClientGone`."""
        conn = self._connection(sid, namespace, allow_pending=True)
        if conn is None:
            raise ClientGone(f"{sid!r} is not connected to {namespace}")
        socket = conn.client.socket
        return lambda: socket.close_reason

    # --- emitting ----------------------------------------------------------------------

    async def emit(
        self,
        event: str,
        *args: Any,
        to: str | Collection[str] | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        skip_sid: str | Collection[str] | None = None,
        callback: Callable[..., Any] | None = None,
        callback_timeout_s: float | None = None,
    ) -> None:
        """Send `event(*args)` to a sid or room(s) (`to`), or to the whole namespace.

        Arguments may hold bytes (sent as a binary event). Never blocks on a slow client
        (see `RealtimeConfig.max_buffered_packets`). With `callback` (`to` must be one
        connected sid), the client's ACK arguments are passed to it from a task in that
        client's session nursery; the callback is dropped if the ACK does not come within
        `callback_timeout_s` or the client disconnects. With a pub/sub, broadcasts also
        go to the other servers. Cancellation may leave the remote publish undone.
        """
        if event in ("connect", "disconnect"):
            raise ValueError(f"{event!r} is a reserved event name")
        rooms = self._rooms_arg(to)
        skip = {skip_sid} if isinstance(skip_sid, str) else set(skip_sid or ())
        if callback is not None:
            conn = self._connection(to, namespace) if isinstance(to, str) else None
            if conn is None:
                raise ClientGone(f"{to!r} is not a connected sid of {namespace}")
            self._emit_with_callback(conn, event, args, callback, callback_timeout_s)
            await trio.lowlevel.checkpoint()
            return
        self._deliver(namespace, event, args, rooms, skip)
        local_sid = isinstance(to, str) and to in self._connections
        if self._pubsub is not None and not local_sid:
            await self._pubsub.publish(
                BroadcastMessage(
                    origin=self.server_id,
                    namespace=namespace,
                    event=event,
                    args=tuple(args),
                    to=rooms,
                    skip_sids=tuple(sorted(skip)),
                )
            )
        else:
            await trio.lowlevel.checkpoint()

    async def call(
        self, event: str, *args: Any, to: str, namespace: str = DEFAULT_NAMESPACE
    ) -> list[Any]:
        """Send `event(*args)` to one client and wait for its ACK arguments.

        Bound the wait with `trio.fail_after`/`move_on_after`. Raises `ClientGone` if the
        client is not connected or leaves first. Cancellation forgets the pending ACK.
        """
        conn = self._connection(to, namespace)
        if conn is None:
            raise ClientGone(f"{to!r} is not a connected sid of {namespace}")
        pending = _PendingAck()
        ack_id: int = self._manager._generate_ack_id(conn.sid, pending)
        try:
            self._send(conn, encode_event(namespace, event, args, ack_id))
            await pending.done.wait()
        finally:
            callbacks = self._manager.callbacks.get(conn.sid)
            if callbacks is not None:
                callbacks.pop(ack_id, None)
        if pending.args is None:
            raise ClientGone(f"{to!r} disconnected before acknowledging {event!r}")
        return pending.args

    def _emit_with_callback(
        self,
        conn: _Connection,
        event: str,
        args: tuple[Any, ...],
        callback: Callable[..., Any],
        timeout_s: float | None,
    ) -> None:
        async def wait_and_call() -> None:
            with trio.move_on_after(timeout_s if timeout_s is not None else float("inf")):
                try:
                    ack = await self.call(event, *args, to=conn.sid, namespace=conn.namespace)
                except ClientGone:
                    return
                result = callback(*ack)
                if inspect.isawaitable(result):
                    await result

        self._spawn(conn, wait_and_call, (), what=f"ack callback for {event!r}")

    def _rooms_arg(self, to: str | Collection[str] | None) -> tuple[str, ...] | None:
        if to is None:
            return None
        if isinstance(to, str):
            return (to,)
        return tuple(to)

    def _deliver(
        self,
        namespace: str,
        event: str,
        args: tuple[Any, ...],
        rooms: tuple[str, ...] | None,
        skip: Collection[str],
    ) -> None:
        """Send to the matching local clients (encoded once)."""
        room_arg = None if rooms is None else (rooms[0] if len(rooms) == 1 else list(rooms))
        messages: Messages | None = None
        for sid, _eio_sid in self._manager.get_participants(namespace, room_arg):
            if sid in skip:
                continue
            conn = self._connections.get(sid)
            if conn is None:
                continue
            if messages is None:
                messages = encode_event(namespace, event, args)
            self._send(conn, messages)

    def _deliver_remote(self, message: BroadcastMessage) -> None:
        if message.origin == self.server_id:
            return
        if message.action == "close_room":
            for room in message.to or ():
                self._close_room_here(room, message.namespace)
            return
        self._deliver(message.namespace, message.event, message.args, message.to, message.skip_sids)

    def _send(self, conn: _Connection, messages: Messages) -> None:
        if conn.pending:
            conn.early.extend(messages)  # flushed right after the CONNECT packet
            return
        socket = conn.client.socket
        for message in messages:
            if not socket.send(message):
                return

    # --- rooms and clients -------------------------------------------------------------

    def enter_room(self, sid: str, room: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        """Put a connected client in `room` (broadcasts with `to=room` reach it)."""
        if self._connection(sid, namespace, allow_pending=True) is None:
            raise ClientGone(f"{sid!r} is not connected to {namespace}")
        self._manager.basic_enter_room(sid, namespace, room)

    def leave_room(self, sid: str, room: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        self._manager.basic_leave_room(sid, namespace, room)

    async def close_room(self, room: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        """Take every client out of `room`, here and (with a pub/sub) on every other
        server: a broadcast to it reaches no one afterwards. Cancellation may leave the
        other servers' rooms as they were."""
        self._close_room_here(room, namespace)
        if self._pubsub is not None:
            await self._pubsub.publish(BroadcastMessage(
                origin=self.server_id, namespace=namespace, event="", args=(), to=(room,),
                action="close_room",
            ))
        else:
            await trio.lowlevel.checkpoint()

    def rooms_of(self, sid: str, namespace: str = DEFAULT_NAMESPACE) -> list[str]:
        """The rooms a connected client is in (its own sid room included)."""
        return list(self._manager.get_rooms(sid, namespace))

    def _close_room_here(self, room: str, namespace: str) -> None:
        if room not in self._manager.rooms.get(namespace, {}):
            return
        if self._manager.is_sid_room(namespace, room):
            return  # a client's own room is never closed
        self._manager.basic_close_room(room, namespace)

    def session_data(self, sid: str, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
        """A dict for the application's per-connection state (gone at disconnect)."""
        conn = self._connection(sid, namespace, allow_pending=True)
        if conn is None:
            raise ClientGone(f"{sid!r} is not connected to {namespace}")
        return conn.data

    def start_task(
        self,
        sid: str,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> trio.CancelScope:
        """Run `fn(*args)` in the client's session nursery, tied to its connection.

        Returns the task's cancel scope (cancel it to stop just this task). The task is
        cancelled when the client leaves the namespace or disconnects; errors are logged.
        """
        conn = self._connection(sid, namespace, allow_pending=True)
        if conn is None:
            raise ClientGone(f"{sid!r} is not connected to {namespace}")
        return self._spawn(conn, fn, args, what=getattr(fn, "__name__", "task"))

    async def disconnect(self, sid: str, namespace: str = DEFAULT_NAMESPACE) -> None:
        """Disconnect a client from `namespace` (DISCONNECT is sent; its tasks cancelled;
        its disconnect handler runs in its session nursery). No-op if not connected.
        Everything happens before the first checkpoint: cancellation cannot split it."""
        conn = self._connection(sid, namespace)
        if conn is not None:
            self._send(conn, encode_disconnect(namespace))
            self._leave(conn, DisconnectReason.SERVER_NAMESPACE_DISCONNECT)
        await trio.lowlevel.checkpoint()

    def _connection(
        self, sid: str | None, namespace: str, *, allow_pending: bool = False
    ) -> _Connection | None:
        """The connection `sid` in `namespace`; one whose connect handler is still
        running only with `allow_pending` (rooms, session data, tasks: not ACKs)."""
        conn = self._connections.get(sid) if sid is not None else None
        if conn is None or conn.namespace != namespace or (conn.pending and not allow_pending):
            return None
        return conn

    def _spawn(
        self,
        conn: _Connection,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        *,
        what: str,
    ) -> trio.CancelScope:
        scope = trio.CancelScope()
        conn.tasks.add(scope)

        async def scoped() -> None:
            try:
                with scope:
                    await fn(*args)
            finally:
                conn.tasks.discard(scope)

        try:
            conn.client.socket.spawn(scoped, what=what)
        except RuntimeError:
            conn.tasks.discard(scope)
            raise ClientGone(f"{conn.sid!r} is disconnecting") from None
        return scope

    # --- Engine.IO session handler -----------------------------------------------------

    async def run_session(self, socket: EngineIOSocket) -> None:
        """Read the client's packets in order until the session ends (cancelled then)."""
        if self._unconnected >= self.config.max_unconnected:
            logger.warning("closing %s: %d sessions have not connected yet",
                           socket.sid, self._unconnected)
            socket.close()
            await trio.lowlevel.checkpoint()
            return
        client = _Client(socket, SocketIOParser(max_attachments=self.config.max_attachments))
        self._clients[socket.sid] = client
        self._unconnected += 1
        try:
            await self._read_packets(client)
        finally:
            if not client.ever_connected:
                self._unconnected -= 1

    async def _read_packets(self, client: _Client) -> None:
        socket = client.socket
        socket.spawn(self._connect_timeout, client, what="connect timeout")
        size = 0  # bytes of the event being assembled (a packet and its attachments)
        while True:
            try:
                data = await socket.receive()
            except SessionEnded:
                return
            size += len(data)
            try:
                event = client.parser.receive(data)
                if event is None:
                    continue
                connecting = isinstance(event, ConnectRequested) or (
                    isinstance(event, PacketRejected) and event.packet_type == CONNECT)
                if not client.ever_connected and not connecting:
                    raise RemoteProtocolError("the first packet must be CONNECT")
            except RemoteProtocolError as exc:
                logger.info("closing %s: %s", socket.sid, exc.message)
                socket.close(CloseReason.PARSE_ERROR)
                return
            await self._dispatch(client, event, size)
            size = 0

    async def session_ended(self, socket: EngineIOSocket, reason: CloseReason) -> None:
        """Run the disconnect handlers of every namespace the client was in, one after
        the other (called shielded and time-limited by the Engine.IO layer): first those
        it left while the session was ending, then the rest with the session's reason."""
        client = self._clients.pop(socket.sid, None)
        if client is None:
            return
        for departed, sid, left in client.departed:
            await run_logged(departed, sid, left, what="disconnect handler")
        why = DisconnectReason(reason.value)
        for conn in list(client.connections.values()):
            handler = self._forget(conn)
            if handler is not None:
                await run_logged(handler, conn.sid, why, what="disconnect handler")

    async def _connect_timeout(self, client: _Client) -> None:
        """Close a session that joins no namespace in time (a session-nursery task)."""
        await trio.sleep(self.config.connect_timeout_s)
        if not client.ever_connected:
            logger.info("closing %s: no CONNECT in time", client.socket.sid)
            client.socket.close()

    async def _dispatch(self, client: _Client, event: SioEvent, size: int = 0) -> None:
        if isinstance(event, ConnectRequested):
            await self._connect(client, event)
        elif isinstance(event, EventReceived):
            conn = client.connections.get(event.namespace)
            handler = self._event_handlers.get((event.namespace, event.event))
            if conn is None or conn.pending:
                logger.debug("event %r for an unconnected namespace", event.event)
            elif handler is None:
                logger.debug("no handler for event %r in %s", event.event, event.namespace)
            elif (conn.inflight_events >= self.config.max_inflight_events
                  or conn.inflight_bytes + size > self.config.max_inflight_bytes):
                await self._refuse_busy(conn, event)
            else:
                conn.inflight_events += 1
                conn.inflight_bytes += size
                try:
                    self._spawn(conn, self._run_event, (conn, handler, event, size),
                                what=event.event)
                except ClientGone:  # the session is closing: drop it
                    conn.inflight_events -= 1
                    conn.inflight_bytes -= size
        elif isinstance(event, AckReceived):
            conn = client.connections.get(event.namespace)
            callbacks = self._manager.callbacks.get(conn.sid) if conn is not None else None
            pending = callbacks.pop(event.ack_id, None) if callbacks else None
            if isinstance(pending, _PendingAck):
                pending.resolve(event.args)
        elif isinstance(event, DisconnectRequested):
            conn = client.connections.get(event.namespace)
            if conn is not None and not conn.pending:
                self._leave(conn, DisconnectReason.CLIENT_NAMESPACE_DISCONNECT)
        elif isinstance(event, PacketRejected):
            self._rejected(client, event)

    def _rejected(self, client: _Client, event: PacketRejected) -> None:
        """Answer a packet whose JSON was refused; the session goes on. A CONNECT gets
        CONNECT_ERROR; an EVENT the rejection handler's ACK; anything else is dropped."""
        logger.info("refused a packet of %s: %s", client.socket.sid, event.reason)
        namespace = event.namespace
        if event.packet_type == CONNECT:
            for message in encode_connect_error(namespace, f"invalid CONNECT: {event.reason}"):
                client.socket.send(message)
            return
        conn = client.connections.get(namespace)
        if conn is None or conn.pending or event.packet_type not in (EVENT, BINARY_EVENT):
            return
        handler = self._rejection_handlers.get(namespace)
        if handler is None:
            if event.ack_id is not None:
                self._send(conn, encode_ack(namespace, event.ack_id, [{"error": event.reason}]))
            return
        call = EventReceived(namespace=namespace, event=PACKET_REJECTED, args=[event.reason],
                             ack_id=event.ack_id)
        conn.inflight_events += 1  # `_run_event` counts it out
        try:
            self._spawn(conn, self._run_event, (conn, handler, call, 0), what=PACKET_REJECTED)
        except ClientGone:
            conn.inflight_events -= 1

    async def _connect(self, client: _Client, event: ConnectRequested) -> None:
        """Run the connect handler inline (later packets of this client wait for it),
        then answer CONNECT or CONNECT_ERROR. If the session ends meanwhile, the handler
        is cancelled and the half-made connection is forgotten without a disconnect call.
        """
        namespace = event.namespace
        socket = client.socket
        if namespace not in self._namespaces:
            for message in encode_connect_error(namespace, "Invalid namespace"):
                socket.send(message)
            return
        if namespace in client.connections:
            logger.debug("%s is already connected to %s", socket.sid, namespace)
            return
        conn = _Connection(sid=new_sid(), namespace=namespace, client=client)
        client.connections[namespace] = conn
        self._connections[conn.sid] = conn
        self._manager.basic_enter_room(conn.sid, namespace, None, eio_sid=socket.sid)
        self._manager.basic_enter_room(conn.sid, namespace, conn.sid, eio_sid=socket.sid)
        handler = self._connect_handlers.get(namespace)
        refusal: ConnectionRefused | None = None
        if handler is not None:
            try:
                await handler(conn.sid, event.auth, socket.scope)
            except ConnectionRefused as exc:
                refusal = exc
            except Exception:
                logger.exception("connect handler for %s failed", namespace)
                refusal = ConnectionRefused("Internal server error")
        if refusal is not None:
            self._forget(conn)
            for message in encode_connect_error(namespace, refusal.message, refusal.data):
                socket.send(message)
            return
        conn.pending = False
        if not client.ever_connected:
            client.ever_connected = True
            self._unconnected -= 1
        early, conn.early = conn.early, []
        self._send(conn, encode_connect(namespace, conn.sid) + early)

    async def _run_event(
        self, conn: _Connection, handler: EventHandler, event: EventReceived, size: int
    ) -> None:
        """One event handler call, then its ACK; cancelled (no ACK) if the client leaves."""
        try:
            result = await handler(conn.sid, *event.args)
        finally:
            conn.inflight_events -= 1
            conn.inflight_bytes -= size
        if event.ack_id is not None and self._connections.get(conn.sid) is conn:
            self._send(conn, encode_ack(conn.namespace, event.ack_id, _ack_args(result)))

    async def _refuse_busy(self, conn: _Connection, event: EventReceived) -> None:
        """An event over the connection's in-flight limits: not run; the busy handler
        (if any) answers it, bounded by the disconnect handler timeout."""
        logger.info("%s: event %r refused: %d events in flight", conn.sid, event.event,
                    conn.inflight_events)
        result: Any = None
        if self._busy_handler is not None:
            with trio.move_on_after(self.config.disconnect_handler_timeout_s):
                try:
                    result = await self._busy_handler(conn.sid, event.event, list(event.args))
                except Exception:
                    logger.exception("busy handler failed")
        else:
            await trio.lowlevel.checkpoint()
        if event.ack_id is not None and self._connections.get(conn.sid) is conn:
            self._send(conn, encode_ack(conn.namespace, event.ack_id, _ack_args(result)))

    def _forget(self, conn: _Connection) -> DisconnectHandler | None:
        """Drop a connection's state, cancel its tasks, fail its pending ACKs; returns
        its disconnect handler if the application had accepted it."""
        conn.client.connections.pop(conn.namespace, None)
        if self._connections.get(conn.sid) is conn:
            del self._connections[conn.sid]
        for scope in list(conn.tasks):
            scope.cancel()
        for ack_id, pending in list(self._manager.callbacks.get(conn.sid, {}).items()):
            if ack_id != 0 and isinstance(pending, _PendingAck):
                pending.resolve(None)
        self._manager.basic_disconnect(conn.sid, conn.namespace)
        if conn.pending:
            return None
        return self._disconnect_handlers.get(conn.namespace)

    def _leave(self, conn: _Connection, reason: DisconnectReason) -> None:
        """A namespace disconnect while the session lives on: the disconnect handler
        runs as a task in the session nursery."""
        handler = self._forget(conn)
        if handler is None:
            return
        try:
            conn.client.socket.spawn(handler, conn.sid, reason, what="disconnect handler")
        except RuntimeError:  # the session is ending: `session_ended` runs it
            conn.client.departed.append((handler, conn.sid, reason))
