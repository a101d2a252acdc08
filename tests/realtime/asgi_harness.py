"""The shared in-process ASGI harness (tests/asgi_harness.py) with Engine.IO's defaults:
requests go to `/socket.io/` and are addressed by their query string."""

from __future__ import annotations

from typing import Any

from ..asgi_harness import LIMIT_S, ASGIApp, Headers, HttpCall, Response, WsCall
from ..asgi_harness import http as _http
from ..asgi_harness import make_scope as _make_scope

__all__ = ["LIMIT_S", "HttpCall", "Response", "WsCall", "http", "make_scope", "ws_call"]

PATH = "/socket.io/"


def make_scope(
    kind: str, query: str, *, method: str = "GET", path: str = PATH, headers: Headers = ()
) -> dict[str, Any]:
    return _make_scope(kind, path, query, method=method, headers=headers)


async def http(
    app: ASGIApp,
    query: str,
    *,
    method: str = "GET",
    body: bytes | str | None = None,
    headers: Headers = (),
    path: str = PATH,
) -> Response:
    """One complete request/response (fails after `LIMIT_S`)."""
    return await _http(app, path, query, method=method, body=body, headers=headers)


def ws_call(
    app: ASGIApp, query: str, *, headers: Headers = (), path: str = PATH, denial: bool = False
) -> WsCall:
    """With `denial=True` the scope offers the websocket denial-response extension (as
    Hypercorn does): a refusal then arrives as `WsCall.denied` (an HTTP response)."""
    scope = make_scope("websocket", query, headers=headers, path=path)
    if denial:
        scope["extensions"] = {"websocket.http.response": {}}
    return WsCall(app, scope)
