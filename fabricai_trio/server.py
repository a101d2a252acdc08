"""Running the app under Hypercorn's trio worker, with clean signal handling."""

from __future__ import annotations

import gc
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import h11
import hypercorn.trio.run
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from .api.raw_refusals import RawRefusals
from .app import FabricApp, create_app
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ConnectionLimits:
    """What `GuardedTCPServer` enforces on one server's connections."""

    write_timeout_s: float
    max_connections: int
    open: int = 0
    #: Writes in progress (their deadlines move up when the server stops).
    writes: set[trio.CancelScope] = field(default_factory=set)
    #: No write may last past this (`trio.current_time()` clock): set at shutdown.
    close_at: float = math.inf

    def close_by(self, deadline: float) -> None:
        """Shutdown: every write, running or future, ends by `deadline` (then its
        connection closes), so a client that stopped reading cannot hold the process
        past the grace period."""
        self.close_at = min(self.close_at, deadline)
        for scope in self.writes:
            scope.deadline = min(scope.deadline, self.close_at)


#: The attribute of a Hypercorn `Config` that carries its `ConnectionLimits`.
LIMITS_ATTRIBUTE = "fabricai_limits"
#: The attribute of a Hypercorn `Config` that carries the app's `RawRefusals`.
RAW_REFUSALS_ATTRIBUTE = "fabricai_raw_refusals"


class GuardedTCPServer(TCPServer):
    """Hypercorn's connection, with a write deadline and a connection cap.

    Hypercorn writes every byte (HTTP, SSE, websocket frames) through `protocol_send`,
    shielded from cancellation: a client that stops reading blocks that write for ever
    (TCP keeps a zero window open indefinitely), which held a request, its generation
    and the server's shutdown. Here a write that does not complete within
    `write_timeout_s` (SLOW_CLIENT_TIMEOUT_SECONDS) closes the connection instead; the
    write is still shielded from other cancellations, so a healthy connection never
    gets half a frame. A connection accepted while `max_connections` are open is closed
    at once. A `Config` without `ConnectionLimits` gets Hypercorn's behaviour.

    A response head that announces a `Content-Length` is held until the next write of
    the connection (its body, or the end of an empty one), and both go in one `send`:
    Hypercorn writes head and body separately, and on loopback each `send` costs about
    as much as the rest of a small response (a 429 went from two system calls to one).
    """

    #: A fixed-length response head waiting for its body (see the class docstring).
    _held = b""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_task = IdleTimer(self)  # type: ignore[assignment]

    async def _read_data(self) -> None:
        """Hypercorn's read loop, with refusals answered from the raw bytes (see
        `_refuse_raw`); when it ends, the connection is done (every way of closing it
        ends this loop), and so is its idle timer."""
        try:
            while True:
                try:
                    with trio.fail_after(self.config.read_timeout or math.inf):
                        data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
                refused = await self._refuse_raw(data)
                if refused is None:
                    await self.protocol.handle(RawData(bytes(data)))
                    if data == b"":
                        break
                elif not refused:  # gone, or asked to close
                    break
            await self.protocol.handle(Closed())
        finally:
            timer = self.idle_task
            if isinstance(timer, IdleTimer):
                timer.close()

    async def _refuse_raw(self, data: bytes | bytearray) -> bool | None:
        """Answer `data` with a refusal if it is one simple request the app would refuse
        now and the connection is between requests (`RawRefusals`, api/raw_refusals.py):
        True if the connection goes on, False if it ends. None: not answered, Hypercorn
        gets `data` as before (anything else: any doubt).

        Refusals take turns here from the start (the decision and the write), not only
        for the write as over ASGI: a storm's connections then wait parked, and a
        scheduling round runs at most `FastRefusals.TURNS` of them, so the running
        streams' steps never wait behind fifty decisions. (A turn for the write alone:
        the streams at 0.79x during a storm, rate and p50 worse; from the start: 0.94x
        to 1.04x; bench/refusals.py, same load.) A request that is not refused waits
        for its turn too, as long as the storm's queue is (at most TURN_WAIT_SECONDS)."""
        raw = getattr(self.config, RAW_REFUSALS_ATTRIBUTE, None)
        limits = self._limits()
        if not isinstance(raw, RawRefusals) or limits is None or not raw.wanted(data):
            return None
        async with raw.fast.turn():  # refusals take turns (api/refusals.py, `__call__`)
            if not self._between_requests():
                return None
            started = time.monotonic()
            h11_protocol = self.protocol.protocol
            client = h11_protocol.client
            reply = await raw.reply(
                bytes(data), client=client[0] if client else None,
                max_head_bytes=self.config.h11_max_incomplete_size,
                extra_headers=self.config.response_headers("h11"),
            )
            if reply is None:
                return None
            h11_protocol.keep_alive_requests += 1  # as Hypercorn counts a request
            await self.context.mark_request()
            gone = await self._write(limits, reply.data)
        ended = time.monotonic()
        raw.ended(reply, ended - started, ended)
        if gone or reply.close:
            return False
        timer = self.idle_task
        if isinstance(timer, IdleTimer):
            await timer.restart(self._task_group, self._idle_timeout)  # idle again, from now
        return True

    def _between_requests(self) -> bool:
        """Hypercorn's HTTP/1 connection is idle: no request in progress, nothing
        buffered, and the next request would not be its last (Hypercorn closes after
        `keep_alive_max_requests`) nor the server stopping."""
        protocol = getattr(self.protocol, "protocol", None)
        if not isinstance(protocol, H11Protocol) or protocol.stream is not None:
            return False
        connection = protocol.connection
        return (
            isinstance(connection, h11.Connection)
            and connection.our_state is h11.IDLE
            and connection.their_state is h11.IDLE
            and not connection.trailing_data[0]
            and protocol.keep_alive_requests + 1 < self.config.keep_alive_max_requests
            and not self.context.terminated.is_set()
        )

    def _limits(self) -> ConnectionLimits | None:
        limits = getattr(self.config, LIMITS_ATTRIBUTE, None)
        return limits if isinstance(limits, ConnectionLimits) else None

    async def run(self) -> None:
        """Serve the connection, unless too many are open. Cancellation: Hypercorn's."""
        limits = self._limits()
        if limits is None:
            await super().run()
            return
        if limits.open >= limits.max_connections:
            log.warning("connection refused: %d connections open (MAX_CONNECTIONS)",
                        limits.open)
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            return
        limits.open += 1
        try:
            await super().run()
        finally:
            limits.open -= 1

    async def protocol_send(self, event: Event) -> None:
        limits = self._limits()
        if limits is None:
            await super().protocol_send(event)
            return
        if not isinstance(event, RawData):
            if self._held and isinstance(event, Closed):
                await self._write(limits, b"")  # the held head goes out before the close
            await super().protocol_send(event)
            return
        if not self._held and fixed_length_head(event.data):
            self._held = event.data
            return
        if not self._held and not event.data:
            await super().protocol_send(event)  # nothing to write (an end of message)
            return
        await self._write(limits, event.data)

    async def _write(self, limits: ConnectionLimits, data: bytes) -> bool:
        """Write the held head (if any) and `data`, within the write deadline; True if
        the connection is gone (then closed)."""
        data, self._held = self._held + data, b""
        gone = False
        async with self.send_lock:
            deadline = min(trio.current_time() + limits.write_timeout_s, limits.close_at)
            with trio.CancelScope(shield=True), trio.move_on_at(deadline) as timer:
                limits.writes.add(timer)
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    gone = True
                finally:
                    limits.writes.discard(timer)
            if timer.cancelled_caught:
                log.info("closing a connection: a write did not complete in %.1f s "
                         "(the client stopped reading)", limits.write_timeout_s)
                with trio.CancelScope(shield=True):
                    await self.stream.aclose()
                gone = True
            if gone:
                await self.protocol.handle(Closed())
        return gone


class IdleTimer:
    """Hypercorn's idle-connection timeout with one task per connection.

    Hypercorn stops its idle task when a request starts (`stop()`) and spawns a new one
    when the connection is idle again (`restart()`): a task cancelled and another
    started per request, about a tenth of the event loop's time in a storm of small
    requests (py-spy, docs/performance.md). Here one task per connection waits, and a
    request only moves its deadline. The behaviour is Hypercorn's `_idle_timeout`: an
    idle connection is closed after `keep_alive_timeout`, or at once when the server
    stops (a busy one when it next becomes idle)."""

    def __init__(self, server: TCPServer) -> None:
        self._server = server
        self._timer = trio.CancelScope()  # its deadline: when an idle connection closes
        self._life = trio.CancelScope()  # cancelled when the connection is done
        self._started = False
        self._idle = False
        self._terminated = False

    async def restart(self, task_group: Any, action: Any) -> None:
        """The connection is idle from now (its first call starts the task)."""
        self._idle = True
        self._timer.deadline = (
            -math.inf if self._terminated
            else trio.current_time() + self._server.config.keep_alive_timeout
        )
        if not self._started:
            self._started = True
            await task_group._nursery.start(self._run)

    async def stop(self) -> None:
        """A request is being served: no timeout. (Like `restart()` after its first
        call, it never checkpoints: a request costs no scheduling round here.)"""
        self._idle = False
        self._timer.deadline = math.inf

    def close(self) -> None:
        """The connection is done: the task ends."""
        self._life.cancel()

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        with self._life:
            task_status.started()
            with self._timer:
                await self._server.context.terminated.wait()
                self._terminated = True
                if not self._idle:  # busy: closed when idle again (deadline now)
                    await trio.sleep_forever()
            with trio.CancelScope(shield=True):
                await self._server._initiate_server_close()


def fixed_length_head(data: bytes) -> bool:
    """Whether `data` is a whole HTTP/1.1 response head with a `Content-Length` (h11
    writes a head as one piece, ending with an empty line)."""
    return (data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n")
            and b"\r\ncontent-length:" in data.lower())


# Hypercorn's trio worker builds its connections from this name.
hypercorn.trio.run.TCPServer = GuardedTCPServer  # type: ignore[attr-defined,misc]


def hypercorn_config(settings: Settings) -> Config:
    """Hypercorn's configuration for `settings`, with our connection limits."""
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.graceful_timeout = settings.shutdown_grace_seconds
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    limit_connections(config, settings)
    return config


def refuse_raw(config: Config, app: FabricApp) -> Config:
    """Let `GuardedTCPServer` answer `app`'s refusals from the raw bytes (RAW_REFUSALS)."""
    setattr(config, RAW_REFUSALS_ATTRIBUTE, app.raw_refusals)
    return config


def limit_connections(config: Config, settings: Settings) -> Config:
    """Bound what one client can hold: idle keep-alive time, websocket message size
    (Hypercorn's default buffers 16 MiB before SOCKETIO_MAX_PAYLOAD applies), request
    head size, write time (`GuardedTCPServer`) and the number of connections."""
    config.keep_alive_timeout = settings.keep_alive_seconds
    config.h11_max_incomplete_size = 64 * 1024
    config.websocket_max_message_size = settings.socketio_max_payload
    setattr(config, LIMITS_ATTRIBUTE, ConnectionLimits(
        write_timeout_s=settings.slow_client_timeout_seconds,
        max_connections=settings.max_connections,
    ))
    return config


async def freeze_startup_objects(app: FabricApp) -> None:
    """Once the models are ready, move every object alive (modules, the app, the models'
    Python side: about 125,000) into the collector's permanent generation. A full
    collection then walks only what serving allocated, instead of pausing the event loop
    for 15-30 ms over objects that live as long as the process. Cancelled before ready:
    nothing is frozen."""
    await app.ready.wait()
    gc.collect()
    gc.freeze()
    log.debug("froze %d start-up objects for the garbage collector", gc.get_freeze_count())


async def serve_app(settings: Settings, app: FabricApp | None = None) -> int:
    """Serve until SIGINT/SIGTERM (drain, then exit 0) or a fatal start-up error (exit 1).

    The first signal starts the drain (`FabricApp.begin_shutdown`): readiness turns 503,
    new requests get 503 `draining`, generations in flight may finish for
    DRAIN_TIMEOUT_SECONDS; then Hypercorn closes idle connections and gives the others
    SHUTDOWN_GRACE_SECONDS. A second signal exits at once (exit 1): the server's nursery
    is cancelled, and only the decode step in flight is waited for.
    """
    app = app or create_app(settings)
    config = refuse_raw(hypercorn_config(settings), app)
    exit_code = 0
    stop = trio.Event()

    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            nonlocal exit_code
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not stop.is_set():
                        log.info("received %s: draining (again to exit at once)", name)
                        stop.set()
                    else:
                        log.warning("received %s again: exiting at once", name)
                        exit_code = 1
                        nursery.cancel_scope.cancel()

        async def watch_fatal() -> None:
            nonlocal exit_code
            await app.fatal.wait()
            exit_code = 1
            stop.set()

        async def shutdown_trigger() -> None:
            await stop.wait()
            if not app.fatal.is_set():
                await app.begin_shutdown()
            limits = getattr(config, LIMITS_ATTRIBUTE, None)
            if isinstance(limits, ConnectionLimits):  # Hypercorn's grace starts now
                limits.close_by(trio.current_time() + settings.shutdown_grace_seconds)

        nursery.start_soon(watch_signals)
        nursery.start_soon(watch_fatal)
        nursery.start_soon(freeze_startup_objects, app)
        await serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    return exit_code
