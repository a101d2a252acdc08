"""Sans-IO decisions about one Engine.IO request before it reaches a session.

The transport parses an HTTP request or a websocket handshake into a `Request` and asks
`route()` what to do with it; the answer is one of the frozen decision dataclasses below,
and every HTTP answer is built here as a `Response`. No trio, no sockets, no ASGI: the
unit tests call `route()` directly.

The checks follow the reference server (`engine.io` `Server.verify()` and `handshake()`),
in its order: path, transport, origin, then either the session id (unknown: 400 code 1) or
the handshake rules (GET only: code 2; a websocket handshake needs a websocket: code 3;
`EIO=4`: code 5). Two additions of ours: a foreign `Origin` is refused (403 code 4, the
reference server's FORBIDDEN answer) unless `RealtimeConfig.cors_origins` allows it, and a
server that is not accepting sessions answers handshakes with 503.

Websocket requests that fail these checks are refused before the upgrade (the reference
server answers such an upgrade with HTTP 400). A websocket that passes them is accepted
first and only then attached to its session: what the session refuses (a second websocket,
a session gone meanwhile) closes the accepted websocket, as the reference server does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from .config import RealtimeConfig
from .eio_session import Transport
from .errors import (
    EioErrorCode,
    Failure,
    ProtocolError,
    RemoteProtocolError,
    error_body,
    http_status_for,
)

Headers = list[tuple[bytes, bytes]]

TEXT_PLAIN: Final = (b"content-type", b"text/plain; charset=UTF-8")
APPLICATION_JSON: Final = (b"content-type", b"application/json")


@dataclass(frozen=True, kw_only=True)
class Request:
    """What the transport read from an HTTP request or a websocket handshake."""

    websocket: bool
    method: str  # "GET" for a websocket handshake
    path: str
    query: Mapping[str, str] = field(default_factory=dict)  # first value of each name
    origin: str | None = None
    host: str | None = None
    content_length: str | None = None
    requested_headers: str | None = None  # Access-Control-Request-Headers

    def __post_init__(self) -> None:
        if self.method != self.method.upper():
            raise ValueError("Request.method must be upper case")


@dataclass(frozen=True, kw_only=True)
class Response:
    """A complete HTTP answer (`content-length` is the transport's business)."""

    status: int
    headers: Headers
    body: bytes = b""


# --- decisions --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Refuse:
    """Answer `response` and stop. For a websocket: refuse the upgrade with it, or, with
    `accept_first`, accept the websocket and close it at once (code from `error`)."""

    error: ProtocolError
    response: Response
    accept_first: bool = False


@dataclass(frozen=True, kw_only=True)
class Preflight:
    """A CORS preflight: answer `response` (204)."""

    response: Response


@dataclass(frozen=True, kw_only=True)
class Handshake:
    """Open a new session on `transport` (answer with `ok()`, or accept the websocket)."""

    transport: Transport
    cors: Headers


@dataclass(frozen=True, kw_only=True)
class Poll:
    """A polling GET of session `sid`."""

    sid: str
    cors: Headers


@dataclass(frozen=True, kw_only=True)
class Post:
    """A polling POST to session `sid`, announcing `content_length` bytes if known."""

    sid: str
    content_length: int | None
    cors: Headers


@dataclass(frozen=True, kw_only=True)
class AttachWebsocket:
    """Accept the websocket, then attach it to session `sid` (an upgrade probe)."""

    sid: str


Decision = Refuse | Preflight | Handshake | Poll | Post | AttachWebsocket


# --- responses --------------------------------------------------------------------------


def ok(cors: Headers, body: str) -> Response:
    """A 200 carrying an Engine.IO payload (or `ok` for a POST)."""
    return Response(status=200, headers=[TEXT_PLAIN, *cors], body=body.encode())


def error_response(exc: BaseException, cors: Headers | None = None) -> Response:
    """The reference server's `{"code", "message"}` error answer for `exc`."""
    headers = [APPLICATION_JSON, *(cors or [])]
    return Response(status=http_status_for(exc), headers=headers, body=error_body(exc))


# --- origin and CORS --------------------------------------------------------------------


def origin_allowed(request: Request, allowed: tuple[str, ...]) -> bool:
    """Whether the request's `Origin` may talk to us.

    No `Origin` header (a non-browser client): allowed. `allowed` empty: same origin only
    (the origin's host:port equals the `Host` header). `("*",)`: any origin.
    """
    origin = request.origin
    if origin is None or "*" in allowed:
        return True
    if allowed:
        return origin.rstrip("/") in {o.rstrip("/") for o in allowed}
    return request.host is not None and urlsplit(origin).netloc.lower() == request.host.lower()


def cors_headers(request: Request) -> Headers:
    """What lets a browser read our answer to an allowed cross-origin request."""
    if request.origin is None:
        return []
    return [
        (b"access-control-allow-origin", request.origin.encode("latin-1")),
        (b"access-control-allow-credentials", b"true"),
        (b"vary", b"Origin"),
    ]


def _preflight(request: Request) -> Response:
    requested = request.requested_headers or "content-type"
    return Response(
        status=204,
        headers=[
            *cors_headers(request),
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", requested.encode("latin-1")),
            (b"access-control-max-age", b"86400"),
        ],
    )


# --- the routing ------------------------------------------------------------------------


def _refuse(
    cors: Headers,
    message: str,
    *,
    code: EioErrorCode = EioErrorCode.BAD_REQUEST,
    failure: Failure = Failure.BAD_REQUEST,
    accept_first: bool = False,
) -> Refuse:
    error = RemoteProtocolError(message, failure=failure, code=code)
    return Refuse(error=error, response=error_response(error, cors), accept_first=accept_first)


def route(
    request: Request,
    config: RealtimeConfig,
    *,
    session_exists: Callable[[str], bool],
    accepting: bool,
) -> Decision:
    """What to do with `request` (see the module docstring for the order of checks).

    `session_exists(sid)` says whether a live session has that id; `accepting` is False
    once the server stops taking new sessions (or cannot run them yet).
    """
    allowed = origin_allowed(request, config.cors_origins)
    cors = cors_headers(request) if allowed else []
    prefix = config.path.rstrip("/")
    if request.path not in (prefix, prefix + "/"):
        return _refuse(cors, "Not found", failure=Failure.NOT_FOUND)
    if request.method == "OPTIONS" and not request.websocket:
        if not allowed:
            return _refuse(cors, "Forbidden", code=EioErrorCode.FORBIDDEN,
                           failure=Failure.FORBIDDEN)
        return Preflight(response=_preflight(request))
    transport = request.query.get("transport")
    if transport not in ("polling", "websocket"):
        return _refuse(cors, "Transport unknown", code=EioErrorCode.UNKNOWN_TRANSPORT)
    if not allowed:
        return _refuse(cors, "Forbidden", code=EioErrorCode.FORBIDDEN,
                           failure=Failure.FORBIDDEN)
    sid = request.query.get("sid") or None  # `sid=` is no sid, as in the reference server
    if sid is not None:
        if not session_exists(sid):
            return _refuse(cors, "Session ID unknown", code=EioErrorCode.UNKNOWN_SID)
        if request.websocket:
            if transport != "websocket":  # the reference server closes it once accepted
                return _refuse(cors, "Bad request", accept_first=True)
            return AttachWebsocket(sid=sid)
        if transport != "polling":
            return _refuse(cors, "Bad request")
        if request.method == "GET":
            return Poll(sid=sid, cors=cors)
        if request.method == "POST":
            try:
                length = None if request.content_length is None else int(request.content_length)
            except ValueError:
                return _refuse(cors, "invalid content-length")
            if length is not None and length < 0:
                return _refuse(cors, "invalid content-length")
            return Post(sid=sid, content_length=length, cors=cors)
        return _refuse(cors, "Bad request")
    if request.method != "GET":
        return _refuse(cors, "Bad handshake method", code=EioErrorCode.BAD_HANDSHAKE_METHOD)
    if transport == "websocket" and not request.websocket:
        return _refuse(cors, "Bad request")
    if request.websocket and transport != "websocket":
        return _refuse(cors, "Bad request", accept_first=True)
    if request.query.get("EIO") != "4":
        return _refuse(
            cors,
            "Unsupported protocol version",
            code=EioErrorCode.UNSUPPORTED_PROTOCOL_VERSION,
        )
    if not accepting:
        return _refuse(cors, "Server not accepting sessions", failure=Failure.UNAVAILABLE)
    return Handshake(transport=Transport(transport), cors=cors)
