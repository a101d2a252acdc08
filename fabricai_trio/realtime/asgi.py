"""The few ASGI pieces the Engine.IO transport needs: types, parsing, responses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import trio

from .eio_request import TEXT_PLAIN, Headers, Request, Response
from .errors import FAILURES, WS_POLICY_VIOLATION, Failure

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def query_params(scope: Scope) -> dict[str, str]:
    """The query string as a dict (first value wins)."""
    raw = scope.get("query_string", b"")
    text = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
    return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of header `name` (lower-case), decoded as latin-1."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def parse_request(scope: Scope) -> Request:
    """An `http` or `websocket` scope as the Engine.IO `Request` it carries."""
    websocket = scope["type"] == "websocket"
    return Request(
        websocket=websocket,
        method="GET" if websocket else str(scope.get("method", "GET")).upper(),
        path=scope.get("path", ""),
        query=query_params(scope),
        origin=header(scope, b"origin"),
        host=header(scope, b"host"),
        content_length=header(scope, b"content-length"),
        requested_headers=header(scope, b"access-control-request-headers"),
    )


async def drain_request(receive: Receive) -> None:
    """Consume request messages until the disconnect.

    Hypercorn's trio worker queues request messages in a small channel and, when the
    response completes, puts `http.disconnect` there too: an app that stopped reading a
    large body would block on its own final `send()`. Running this next to the response
    keeps that channel moving. Cancel it once the response is sent (cancelling it
    loses nothing that matters: the request is over).
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _with_length(response: Response) -> Headers:
    return [*response.headers, (b"content-length", str(len(response.body)).encode())]


async def send_response(receive: Receive, send: Send, response: Response) -> None:
    """Send a complete HTTP response while draining whatever the client still sends.

    Cancellation may leave the response half-sent; the server then drops the connection.
    """
    start = {"type": "http.response.start", "status": response.status}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain_request, receive)
        await send({**start, "headers": _with_length(response)})
        await send({"type": "http.response.body", "body": response.body, "more_body": False})
        nursery.cancel_scope.cancel()


async def deny_websocket(scope: Scope, send: Send, response: Response, close_code: int) -> None:
    """Refuse a websocket before accepting it.

    With the ASGI websocket denial-response extension (Hypercorn has it) the client gets
    `response`; without it, the server answers 403 (the ASGI rule for a close before
    accept) and `close_code` is what the application reports.
    """
    if "websocket.http.response" in scope.get("extensions", {}):
        start = {"type": "websocket.http.response.start", "status": response.status}
        await send({**start, "headers": _with_length(response)})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": close_code})


class PrefixDispatcher:
    """Send `http`/`websocket` scopes under a path prefix to its app, the rest to
    `fallback` (lifespan included).

    Mount Socket.IO next to the main app with
    `PrefixDispatcher({"/socket.io/": server.asgi_app}, fallback=quart_app)`. Without a
    fallback, lifespan is acknowledged here and other paths get 404.
    """

    def __init__(self, routes: dict[str, ASGIApp], fallback: ASGIApp | None = None) -> None:
        self.routes = routes
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route one scope; cancellation is the routed app's business."""
        if scope["type"] in ("http", "websocket"):
            path: str = scope.get("path", "")
            for prefix, app in self.routes.items():
                if path == prefix.rstrip("/") or path.startswith(prefix):
                    await app(scope, receive, send)
                    return
        if self.fallback is not None:
            await self.fallback(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
        else:
            not_found = Response(status=FAILURES[Failure.NOT_FOUND][0], headers=[TEXT_PLAIN],
                                 body=b"not found")
            await send_response(receive, send, not_found)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
