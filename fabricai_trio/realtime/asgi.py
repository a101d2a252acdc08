"""The few ASGI pieces the Engine.IO transport needs: types, query, headers, responses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Headers = list[tuple[bytes, bytes]]

TEXT_PLAIN = (b"content-type", b"text/plain; charset=UTF-8")
APPLICATION_JSON = (b"content-type", b"application/json")


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


def origin_allowed(scope: Scope, allowed: tuple[str, ...]) -> bool:
    """Whether the request's `Origin` may talk to us.

    No `Origin` header (a non-browser client): allowed. `allowed` empty: same origin only
    (the origin's host:port equals the `Host` header). `("*",)`: any origin.
    """
    origin = header(scope, b"origin")
    if origin is None:
        return True
    if "*" in allowed:
        return True
    if allowed:
        return origin.rstrip("/") in {o.rstrip("/") for o in allowed}
    host = header(scope, b"host")
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()


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


async def send_response(
    receive: Receive,
    send: Send,
    status: int,
    body: bytes = b"",
    headers: Headers | None = None,
) -> None:
    """Send a complete HTTP response while draining whatever the client still sends.

    Cancellation may leave the response half-sent; the server then drops the connection.
    """
    all_headers = list(headers or [])
    all_headers.append((b"content-length", str(len(body)).encode()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain_request, receive)
        await send({"type": "http.response.start", "status": status, "headers": all_headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        nursery.cancel_scope.cancel()


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
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send_response(receive, send, 404, b"not found", [TEXT_PLAIN])


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
