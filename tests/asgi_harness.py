"""Drive an ASGI app in process: its lifespan, HTTP requests and websockets as ASGI
messages, no sockets.

The fake server behaves like Hypercorn's trio worker where the app can tell:

* the lifespan runs first (`lifespan.startup` → `.complete`) and is shut down last,
  after every request still open has been disconnected and has returned;
* request body messages go through a small bounded channel; once the body is sent,
  `receive()` blocks until the client goes away;
* `http.disconnect` is queued when the response has completed, or when the test
  disconnects the client (at any point: before the response starts, mid-stream);
* after a disconnect the app's further sends are dropped, as Hypercorn drops writes to
  a closed connection.

Timing: the harness never sleeps. Each exchange is bounded by `LIMIT_S` as a hang guard
only; under `trio.testing.MockClock(autojump_threshold=0)` (pytest-trio's
`autojump_clock` fixture) a hang fails at once in real time and every timer of the app
(keep-alives, the fake engine's steps) runs in virtual time.
"""

from __future__ import annotations

import json as jsonlib
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import trio

from .sse_client import SSEEvent, parse_lines

Message = dict[str, Any]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
"""Any ASGI callable (the app's own annotations for scope and messages vary)."""
Headers = Iterable[tuple[bytes, bytes]] | Mapping[str, str]

LIMIT_S = 5.0
"""How long any single exchange may take before the test fails (a hang guard, never a
budget: under MockClock this is virtual time)."""


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    def header(self, name: str) -> str | None:
        value = self.headers.get(name.lower().encode())
        return None if value is None else value.decode("latin-1")

    def events(self) -> list[SSEEvent]:
        """The body as SSE events (comments included, as `SSEEvent.comment`)."""
        return list(parse_lines(iter(self.text.split("\n"))))


def header_list(headers: Headers) -> list[tuple[bytes, bytes]]:
    if isinstance(headers, Mapping):
        return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    return list(headers)


def make_scope(
    kind: str,
    path: str,
    query: str = "",
    *,
    method: str = "GET",
    headers: Headers = (),
) -> dict[str, Any]:
    """An HTTP or websocket scope as Hypercorn builds it."""
    return {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "scheme": "http" if kind == "http" else "ws",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"localhost"), *header_list(headers)],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
        "extensions": {},
    }


@dataclass(eq=False)  # hashable by identity: a client keeps a set of open calls
class HttpCall:
    """One HTTP exchange; start it with `nursery.start(call.run)` or `await call.run()`.

    `status`/`headers` are set when the response starts (`started`), the body
    accumulates in `body` and is also readable chunk by chunk (`next_chunk()`), and
    `done` is set when the app's call has returned.
    """

    app: ASGIApp
    scope: dict[str, Any]
    chunks: list[bytes] = field(default_factory=list)
    more_body: bool = False
    status: int | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False  # the app sent its last body message
    disconnected: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    started: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self._to_app, self._from_test = trio.open_memory_channel[Message](10)
        self._body_in, self._body_out = trio.open_memory_channel[bytes](math.inf)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._feed)
                task_status.started()
                await self.app(self.scope, self._from_test.receive, self._send)
                nursery.cancel_scope.cancel()
        finally:
            self._body_in.close()
            self.done.set()

    async def _feed(self) -> None:
        if not self.chunks:
            await self._to_app.send({"type": "http.request", "body": b"", "more_body": False})
            return
        for i, chunk in enumerate(self.chunks):
            last = i == len(self.chunks) - 1 and not self.more_body
            await self._to_app.send({"type": "http.request", "body": chunk, "more_body": not last})

    async def send_chunk(self, chunk: bytes, *, more: bool = True) -> None:
        await self._to_app.send({"type": "http.request", "body": chunk, "more_body": more})

    async def disconnect(self) -> None:
        """The client goes away (idempotent): the app receives `http.disconnect`."""
        if not self.disconnected:
            self.disconnected = True
            await self._to_app.send({"type": "http.disconnect"})

    async def _send(self, message: Message) -> None:
        if self.disconnected:
            await trio.lowlevel.checkpoint()
            return  # the connection is gone: Hypercorn drops the write
        if message["type"] == "http.response.start":
            assert self.status is None, "http.response.start sent twice"
            self.status = message["status"]
            self.headers = {bytes(k).lower(): bytes(v) for k, v in message.get("headers", [])}
            self.started.set()
        elif message["type"] == "http.response.body":
            assert self.status is not None, "body before http.response.start"
            chunk = message.get("body", b"")
            self.body += chunk
            if chunk:
                self._body_in.send_nowait(chunk)
            if not message.get("more_body", False):
                self.complete = True
                self._body_in.close()
                await self.disconnect()  # what hypercorn does once the response is over
        await trio.lowlevel.checkpoint()

    async def next_chunk(self) -> bytes | None:
        """The next body chunk the app sent; None once the body (or the call) ended."""
        with trio.fail_after(LIMIT_S):
            try:
                return await self._body_out.receive()
            except trio.EndOfChannel:
                return None

    async def wait_started(self) -> None:
        """Until the response starts; fails if the app returns without starting one."""
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                async def watch(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch, self.started)
                nursery.start_soon(watch, self.done)
        assert self.status is not None, "the app returned without a response"

    async def wait_done(self) -> None:
        with trio.fail_after(LIMIT_S):
            await self.done.wait()

    def response(self) -> Response:
        assert self.status is not None, "no response"
        return Response(self.status, self.headers, self.body)


async def http(
    app: ASGIApp,
    path: str,
    query: str = "",
    *,
    method: str = "GET",
    body: bytes | str | None = None,
    headers: Headers = (),
) -> Response:
    """One complete request/response (fails after `LIMIT_S`)."""
    chunks = [body.encode() if isinstance(body, str) else body] if body is not None else []
    call = HttpCall(app, make_scope("http", path, query, method=method, headers=headers), chunks)
    with trio.fail_after(LIMIT_S):
        await call.run()
    return call.response()


class Stream:
    """A streaming response as the client reads it: chunks, or SSE events one by one."""

    def __init__(self, call: HttpCall) -> None:
        self.call = call
        self._buffer = b""
        self._pending: deque[SSEEvent] = deque()

    @property
    def status(self) -> int:
        assert self.call.status is not None
        return self.call.status

    def header(self, name: str) -> str | None:
        return self.call.response().header(name)

    async def next_event(self, *, comments: bool = True) -> SSEEvent | None:
        """The next SSE event (or `: comment`); None at the end of the body."""
        while True:
            while self._pending:
                event = self._pending.popleft()
                if comments or event.comment is None:
                    return event
            chunk = await self.call.next_chunk()
            if chunk is None:
                return None
            self._buffer += chunk
            while b"\n\n" in self._buffer:
                block, self._buffer = self._buffer.split(b"\n\n", 1)
                self._pending.extend(parse_lines(iter([*block.decode().split("\n"), ""])))

    async def events(self, *, comments: bool = True) -> AsyncIterator[SSEEvent]:
        """The remaining events; stop early with `break`, the stream stays usable."""
        while (event := await self.next_event(comments=comments)) is not None:
            yield event

    async def rest(self, *, comments: bool = False) -> list[SSEEvent]:
        """Every remaining event until the body ends (data events only by default)."""
        return [event async for event in self.events(comments=comments)]

    async def disconnect(self) -> None:
        """The client goes away now; returns once the app's call has ended."""
        await self.call.disconnect()
        await self.call.wait_done()


@dataclass
class Lifespan:
    """The app's lifespan call: `startup()` waits for `.complete`, `shutdown()` for its end."""

    app: ASGIApp
    started: trio.Event = field(default_factory=trio.Event)
    ended: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self._to_app, self._from_test = trio.open_memory_channel[Message](10)
        self._from_app, self._replies = trio.open_memory_channel[Message](10)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._to_app.send({"type": "lifespan.startup"})
        task_status.started()
        try:
            await self.app({"type": "lifespan", "asgi": {"version": "3.0"}},
                           self._from_test.receive, self._from_app.send)
        finally:
            self.ended.set()

    async def expect(self, kind: str) -> None:
        with trio.fail_after(LIMIT_S):
            reply = await self._replies.receive()
        assert reply["type"] == kind, reply

    async def shutdown(self) -> None:
        await self._to_app.send({"type": "lifespan.shutdown"})
        await self.expect("lifespan.shutdown.complete")
        with trio.fail_after(LIMIT_S):
            await self.ended.wait()


class Client:
    """Requests to an app whose lifespan is running (see `serve()`)."""

    def __init__(self, app: ASGIApp, nursery: trio.Nursery, headers: Headers = ()) -> None:
        self.app = app
        self.nursery = nursery
        self.default_headers = header_list(headers)
        self.open: set[HttpCall] = set()

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Headers = (),
    ) -> HttpCall:
        extra = header_list(headers)
        if json is not None:
            body = jsonlib.dumps(json).encode()
            extra.append((b"content-type", b"application/json"))
        if body is not None:
            extra.append((b"content-length", str(len(body)).encode()))
        query = urlencode(params or {}, doseq=True)
        scope = make_scope("http", path, query, method=method,
                           headers=[*self.default_headers, *extra])
        return HttpCall(self.app, scope, [body] if body else [])

    async def request(self, method: str, path: str, **kwargs: Any) -> Response:
        """One whole request and response."""
        call = self.call(method, path, **kwargs)
        with trio.fail_after(LIMIT_S):
            await call.run()
        return call.response()

    async def get(self, path: str, **kwargs: Any) -> Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Response:
        return await self.request("POST", path, **kwargs)

    @asynccontextmanager
    async def stream(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[Stream]:
        """A request whose response is read as it comes; on exit the client disconnects
        (if the response is not over) and the app's call has returned."""
        call = self.call(method, path, **kwargs)
        await self.nursery.start(call.run)
        self.open.add(call)
        try:
            await call.wait_started()
            yield Stream(call)
        finally:
            with trio.CancelScope(shield=True):
                await call.disconnect()
                await call.wait_done()
            self.open.discard(call)

    async def status(self, *, headers: Headers = ()) -> dict[str, Any]:
        """`GET /v1/status` as JSON."""
        response = await self.get("/v1/status", headers=headers)
        assert response.status == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    async def wait_status(self, *, active: int, queued: int, headers: Headers = ()) -> None:
        """Until `/v1/status` shows this many active and queued (each step lets every
        other task run first; a hang guard, never a budget)."""
        with trio.fail_after(LIMIT_S):
            while True:
                concurrency = (await self.status(headers=headers))["concurrency"]
                if (concurrency["active"], concurrency["queued"]) == (active, queued):
                    return
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(0.001)


@asynccontextmanager
async def serve(app: ASGIApp, *, headers: Headers = ()) -> AsyncIterator[Client]:
    """Run the app's lifespan, wait until `/health` is 200, yield a client; on exit
    disconnect what is still open, then shut the lifespan down (Hypercorn's order)."""
    async with trio.open_nursery() as nursery:
        lifespan = Lifespan(app)
        await nursery.start(lifespan.run)
        await lifespan.expect("lifespan.startup.complete")
        client = Client(app, nursery, headers)
        with trio.fail_after(LIMIT_S):
            while (await client.get("/health")).status != 200:
                await trio.sleep(0.001)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True):
                for call in list(client.open):
                    await call.disconnect()
                    await call.wait_done()
                await lifespan.shutdown()


@dataclass
class WsCall:
    """A websocket as the app sees it; frames the app sent land in `frames`.

    If the scope offers the websocket denial-response extension (as Hypercorn does), a
    refusal arrives as `denied` (an HTTP response)."""

    app: ASGIApp
    scope: dict[str, Any]
    accepted: bool = False
    close_code: int | None = None
    denied: Response | None = None
    closed: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self._to_app, self._from_test = trio.open_memory_channel[Message](10)
        self._frames_in, self._frames_out = trio.open_memory_channel[str | bytes](1000)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._to_app.send({"type": "websocket.connect"})
        task_status.started()
        try:
            await self.app(self.scope, self._from_test.receive, self._send)
        finally:
            self.closed.set()

    async def _send(self, message: Message) -> None:
        if message["type"] == "websocket.accept":
            self.accepted = True
        elif message["type"] == "websocket.send":
            text = message.get("text")
            await self._frames_in.send(text if text is not None else message["bytes"])
        elif message["type"] == "websocket.close":
            self.close_code = message.get("code", 1000)
            self.closed.set()
        elif message["type"] == "websocket.http.response.start":
            assert not self.accepted, "a denial response after accept"
            self.denied = Response(message["status"], dict(message.get("headers", [])), b"")
        elif message["type"] == "websocket.http.response.body":
            assert self.denied is not None
            self.denied.body += message.get("body", b"")
            if not message.get("more_body", False):
                self.closed.set()

    async def send(self, data: str | bytes) -> None:
        key = "text" if isinstance(data, str) else "bytes"
        await self._to_app.send({"type": "websocket.receive", key: data})

    async def disconnect(self) -> None:
        await self._to_app.send({"type": "websocket.disconnect", "code": 1000})

    async def receive(self) -> str | bytes:
        with trio.fail_after(LIMIT_S):
            return await self._frames_out.receive()

    def pending(self) -> list[str | bytes]:
        out: list[str | bytes] = []
        while True:
            try:
                out.append(self._frames_out.receive_nowait())
            except trio.WouldBlock:
                return out

    async def wait_closed(self) -> int | None:
        with trio.fail_after(LIMIT_S):
            await self.closed.wait()
        return self.close_code
