"""Per-request context: `X-Request-Id`, one structured log line, HTTP metrics.

`RequestObserver` wraps every HTTP ASGI call (Quart routes and mounted apps alike):

* the request id is the client's `X-Request-Id` when it is valid (1-128 characters of
  `[A-Za-z0-9_.:-]`, the rule of `GenerationRequest.request_id`), else a new one; routes
  read it with `request_id()` so a generation without a body `request_id` uses it too;
* every response carries `X-Request-Id` (a route that set its own, e.g. the id of a
  generation named in the body, keeps it);
* when the call ends (the whole stream sent, or the client gone) one log line says id,
  route, status, an owner tag (never
  the owner id), timings and, for a generation, tokens and finish reason. Prompt
  text is logged only with `LOG_PROMPTS=true`. 429s are logged in aggregate
  (`RefusalTally`): a storm of refusals must not cost a line each;
* a response that ends before the app has received the request body (a 401 from the
  auth hook, a 404, a GET with a body) waits for the body first, briefly: Hypercorn
  (0.18, h11) otherwise races recycling the keep-alive connection against the unread
  body, and the client's next request on that connection can hang.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import trio
from quart import Quart, request

from ..auth import Identity
from ..core.errors import REFUSAL_STATUS
from ..core.ids import is_request_id, new_request_id
from .auth_hook import IDENTITY_SCOPE_KEY

if TYPE_CHECKING:
    from ..generation import Generation
    from ..metrics import Metrics
    from ..settings import Settings

log = logging.getLogger("fabricai_trio.requests")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

REQUEST_ID_SCOPE_KEY = "fabricai.request_id"
ROUTE_SCOPE_KEY = "fabricai.route"
GENERATION_SCOPE_KEY = "fabricai.generation"
#: Status logged when the client left before a response started (nginx's convention).
CLIENT_CLOSED = 499
#: How long a finished response waits for an unread request body (see the docstring).
BODY_WAIT_SECONDS = 1.0


def request_id() -> str:
    """The current request's id (see the module docstring)."""
    value = request.scope.get(REQUEST_ID_SCOPE_KEY)
    return value if isinstance(value, str) else new_request_id()


def attach_generation(scope: dict[str, Any], generation: Generation) -> None:
    """Let the request's log line report this generation's tokens and outcome."""
    scope[GENERATION_SCOPE_KEY] = generation


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The request id of a request with these headers: the client's first valid
    `X-Request-Id`, else a new one (see the module docstring)."""
    for key, value in headers:
        if key.lower() == b"x-request-id":
            client_id = bytes(value).decode("latin-1")
            return client_id if client_id and is_request_id(client_id) else new_request_id()
    return new_request_id()


class RefusalTally:
    """429s in aggregate. The first after `interval` seconds without one is logged as
    any request is; those that follow within the interval are counted, by route (their
    own lines go to DEBUG), and the counts are logged as one INFO line by the first
    request of any kind that ends after the interval. `/metrics` counts every 429
    (`fabricai_http_requests_total`). `interval` 0: nothing is aggregated."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._until = -float("inf")  # end of the current interval (monotonic)
        self._counts: dict[str, int] = {}

    def absorbed(self, route: str, now: float) -> bool:
        """Count a 429 of `route`; True if its line is left to the aggregate."""
        if self.interval <= 0:
            return False
        if now >= self._until:
            self._until = now + self.interval
            return False
        self._counts[route] = self._counts.get(route, 0) + 1
        return True

    def due(self, now: float) -> dict[str, int] | None:
        """The counts of an interval that has ended (then forgotten), else None."""
        if not self._counts or now < self._until:
            return None
        counts, self._counts = self._counts, {}
        return counts


class RequestObserver:
    """Wraps an HTTP ASGI call; see the module docstring."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.log_prompts = settings.log_prompts
        self.metrics = metrics
        self.refusals = RefusalTally(settings.refusal_log_seconds)

    async def __call__(
        self, scope: dict[str, Any], receive: Any, send: Any, app: ASGIApp, *, mount: str | None
    ) -> None:
        rid = request_id_of(scope.get("headers", ()))
        scope[REQUEST_ID_SCOPE_KEY] = rid
        started = time.monotonic()
        status: int | None = None
        closing = False
        body_received = trio.Event()

        async def receive_tracked() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_received.set()
            return message

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status, rid, closing
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", ()))
                closing = (b"connection", b"close") in (
                    (bytes(k).lower(), bytes(v).lower()) for k, v in headers
                )
                own = [v for k, v in headers if bytes(k).lower() == b"x-request-id"]
                if own:
                    rid = bytes(own[0]).decode("latin-1")
                else:
                    headers.append((b"x-request-id", rid.encode()))
                    message = {**message, "headers": headers}
            elif (
                message["type"] == "http.response.body"
                and not message.get("more_body", False)
                and mount is None
                and not closing
            ):
                with trio.move_on_after(BODY_WAIT_SECONDS):
                    await body_received.wait()
            await send(message)

        try:
            await app(scope, receive_tracked if mount is None else receive, send_with_id)
        finally:
            ended = time.monotonic()
            self.ended(
                scope, rid, mount or scope.get(ROUTE_SCOPE_KEY) or "unmatched",
                status if status is not None else CLIENT_CLOSED, ended - started, ended,
                quiet=mount is not None,
            )

    def ended(
        self, scope: dict[str, Any], rid: str, route: str, status: int, seconds: float,
        now: float, *, quiet: bool = False,
    ) -> None:
        """A request has ended (`now`, monotonic): its metrics and its log line (DEBUG
        if `quiet`, a mounted app's; a 429 maybe left to the aggregate). `scope` needs
        only `method` (and the identity, if known). The connection layer's raw refusals
        (server.py) end here too."""
        self.metrics.on_request(route, scope["method"], status, seconds)
        self._log_refusals(now)
        level = logging.DEBUG if quiet else logging.INFO
        if status == REFUSAL_STATUS and self.refusals.absorbed(route, now):
            level = logging.DEBUG
        if log.isEnabledFor(level):
            fields = self._fields(scope, rid, route, status, seconds)
            log.log(level, "request %s", _as_text(fields), extra={"fields": fields})

    def _log_refusals(self, now: float) -> None:
        """The line of an interval of 429s that has ended (`RefusalTally`)."""
        counts = self.refusals.due(now)
        if counts is None:
            return
        fields: dict[str, Any] = {"status": REFUSAL_STATUS, "count": sum(counts.values()),
                                  "routes": counts, "seconds": self.refusals.interval}
        log.info("refused %d more request(s) with %d within %.1f s: %s", fields["count"],
                 REFUSAL_STATUS, self.refusals.interval,
                 " ".join(f"{route}={n}" for route, n in counts.items()),
                 extra={"fields": fields})

    def _fields(
        self,
        scope: dict[str, Any],
        rid: str,
        route: str,
        status: int,
        seconds: float,
    ) -> dict[str, Any]:
        identity = scope.get(IDENTITY_SCOPE_KEY)
        fields: dict[str, Any] = {
            "request_id": rid,
            "method": scope["method"],
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            # A tag, never the owner id: a key's id names its sessions (auth.py).
            "owner": identity.tag if isinstance(identity, Identity) else None,
        }
        generation: Generation | None = scope.get(GENERATION_SCOPE_KEY)
        if generation is not None:
            fields.update(
                generation_id=generation.request_id,
                session_id=generation.request.session_id,
                finish_reason=generation.finish_reason,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                ttft_ms=(
                    None
                    if generation.ttft_seconds is None
                    else round(generation.ttft_seconds * 1000, 3)
                ),
            )
            if self.log_prompts:
                req = generation.request
                fields["prompt"] = (
                    req.prompt
                    if req.prompt is not None
                    else [m.model_dump() for m in req.messages or ()]
                )
        return fields


def _as_text(fields: dict[str, Any]) -> str:
    return " ".join(
        f"{key}={json.dumps(value) if isinstance(value, (str, list)) else value}"
        for key, value in fields.items()
        if value is not None
    )


def init_app(app: Quart) -> None:
    """Record the matched route template (a bounded metrics label, unlike the path)."""

    @app.before_request
    async def _record_route() -> None:
        rule = request.url_rule
        scope = cast(dict[str, Any], request.scope)
        scope[ROUTE_SCOPE_KEY] = rule.rule if rule is not None else None


# --- log output ---

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a request line carries its fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry["message"] = record.msg.split(" ", 1)[0] if isinstance(record.msg, str) else ""
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(settings: Settings) -> None:
    """Root logging for the server process: LOG_LEVEL and LOG_FORMAT."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if settings.log_format == "json" else logging.Formatter(
        TEXT_FORMAT
    )
    handler.setFormatter(formatter)
    logging.basicConfig(level=settings.log_level, handlers=[handler])
