"""Drive an ASGI app by hand: requests and websockets made of ASGI messages, no sockets.

The fake server behaves like Hypercorn's trio worker where it matters: request messages
go through a small bounded channel, and `http.disconnect` is queued when the response
completes or when the test disconnects the client.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from fabricai_trio.realtime.asgi import ASGIApp, Message

LIMIT_S = 5.0
"""How long any single exchange may take before the test fails (never hang)."""


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def make_scope(
    kind: str,
    query: str,
    *,
    method: str = "GET",
    path: str = "/socket.io/",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> dict[str, Any]:
    return {
        "type": kind,
        "method": method,
        "path": path,
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 5000),
    }


@dataclass
class HttpCall:
    """One HTTP exchange; start it with `nursery.start(call.run)` or `await call.result()`."""

    app: ASGIApp
    scope: dict[str, Any]
    chunks: list[bytes] = field(default_factory=list)
    more_body: bool = False
    status: int | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    done: trio.Event = field(default_factory=trio.Event)
    started: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self._to_app, self._from_test = trio.open_memory_channel[Message](10)
        self._closed = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._feed)
            task_status.started()
            await self.app(self.scope, self._from_test.receive, self._send)
            self.done.set()
            nursery.cancel_scope.cancel()

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
        if not self._closed:
            self._closed = True
            await self._to_app.send({"type": "http.disconnect"})

    async def _send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = dict(message.get("headers", []))
            self.started.set()
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")
            if not message.get("more_body", False):
                await self.disconnect()  # what hypercorn does once the response is over

    def response(self) -> Response:
        assert self.status is not None, "no response"
        return Response(self.status, self.headers, self.body)


async def http(
    app: ASGIApp,
    query: str,
    *,
    method: str = "GET",
    body: bytes | str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
    path: str = "/socket.io/",
) -> Response:
    """One complete request/response (fails after `LIMIT_S`)."""
    chunks = [body.encode() if isinstance(body, str) else body] if body is not None else []
    call = HttpCall(
        app, make_scope("http", query, method=method, headers=headers, path=path), chunks
    )
    with trio.fail_after(LIMIT_S):
        await call.run()
    return call.response()


@dataclass
class WsCall:
    """A websocket as the app sees it; frames the app sent land in `frames`.

    With `denial=True` the scope offers the websocket denial-response extension (as
    Hypercorn does): a refusal then arrives as `denied` (an HTTP response)."""

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


def ws_call(
    app: ASGIApp,
    query: str,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    path: str = "/socket.io/",
    denial: bool = False,
) -> WsCall:
    scope = make_scope("websocket", query, headers=headers, path=path)
    if denial:
        scope["extensions"] = {"websocket.http.response": {}}
    return WsCall(app, scope)
