"""Refusing a generation before the web framework runs: a full model's 429, cheaply.

A storm of requests at a full server used to be refused one by one after the whole
framework had run for each (Quart's request context, routing, hooks, the route's body
parsing, the error handler): about 1.8 ms of CPU per 429, taken from the event loop
that also feeds the running streams. `FastRefusals` answers those requests straight
over ASGI with **the same answer** (status, headers, body) the framework would give,
because it asks the same code in the same order, and hands the request on to Quart
whenever anything but that refusal could be the answer:

1. Only `POST /v1/completions`, `POST /v1/chat/completions` and `POST
   /v1/inference_sse` (not a reconnect: no `Last-Event-ID` header, no query string),
   and only while some model refuses someone (`GenerationService.may_refuse()`, a few
   comparisons): a server with room pays nothing more.
2. Authentication first (`Authenticator.identify()`, which counts nothing): a request
   it would not accept goes to Quart, whose auth hook answers 401 (and counts a failed
   attempt once), so an unauthenticated client never learns the server is busy.
3. The body: `Content-Type: application/json`, at most MAX_BODY_BYTES, read within
   BODY_TIMEOUT_SECONDS, parsed by `core.jsonparse` and the route's own parser into a
   `GenerationRequest`. The request's model is therefore the one its `model` field names,
   exactly as on the framework path (there is no guess from a partial parse); a body the
   route would refuse goes to the route, which refuses it.
4. `GenerationService.refusal()`: `prepare`'s checks up to the queue (model, draining,
   loading, duplicate id, queue and per-key share), by the same code; a full queue is
   counted in `fabricai_queue_rejections_total` there. A request naming a session is
   never answered here (`prepare` reads the store before it looks at the queue).

A request handed on gets the body already read replayed to it. The answer is rendered
by the framework's own error response (`http_errors.error_response`), once per distinct
error, then served from a small cache: it is the framework's answer byte for byte.
The request observer (X-Request-Id, metrics, the log line) wraps this as any request.

The decisions take a transport-free `Head`: the connection layer's raw path
(api/raw_refusals.py) asks the same ones (`decide`) for a request it read whole,
before Hypercorn parses it, and takes its turn from the same limiter (`turn`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from quart import Quart

from ..auth import ANONYMOUS_IDENTITY, Authenticator, Identity
from ..core import jsonparse
from ..core.errors import Dialect, DomainError
from ..core.requests import GenerationRequest
from ..generation import GenerationService
from ..metrics import Metrics
from .auth_hook import IDENTITY_SCOPE_KEY
from .http_errors import error_response
from .openai.routes import chat_generation_request, completion_generation_request
from .request_log import REQUEST_ID_SCOPE_KEY, ROUTE_SCOPE_KEY
from .routes import is_json_content_type, sse_generation_request

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
Message = dict[str, Any]
#: A route's parser: the decoded body and the request id -> the request (or a `DomainError`).
Parser = Callable[[Any, str], GenerationRequest]


@dataclass(frozen=True, slots=True)
class GenerationRoute:
    """A route that starts a generation, as the fast path knows it."""

    path: str
    dialect: Dialect
    parse: Parser
    #: A `Last-Event-ID` (header or query) makes a request to it a reconnect.
    resumable: bool = False


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole HTTP response: status, ASGI headers, body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def generation_routes(
    service: GenerationService, max_tokens_limit: int
) -> dict[str, GenerationRoute]:
    """The routes the fast path covers, each with the parser its route uses."""

    def chat(body: Any, rid: str) -> GenerationRequest:
        return chat_generation_request(body, rid=rid, max_tokens_limit=max_tokens_limit)[1]

    def completion(body: Any, rid: str) -> GenerationRequest:
        return completion_generation_request(body, rid=rid, max_tokens_limit=max_tokens_limit)[1]

    def sse(body: Any, rid: str) -> GenerationRequest:
        return sse_generation_request(service, body, rid)

    routes = (
        GenerationRoute("/v1/chat/completions", "openai", chat),
        GenerationRoute("/v1/completions", "openai", completion),
        GenerationRoute("/v1/inference_sse", "native", sse, resumable=True),
    )
    return {route.path: route for route in routes}


@dataclass(frozen=True, slots=True)
class Head:
    """What the decisions look at before the body, as ASGI gives it (lower-case header
    names, the path decoded, the query string raw); no transport in it."""

    method: str
    path: str
    query_string: bytes
    headers: Sequence[tuple[bytes, bytes]]
    #: The client's address (the auth throttle's key).
    client: str | None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the fast path answers: its route, who asked, and the refusal."""

    route: GenerationRoute
    identity: Identity
    error: DomainError


def scope_head(scope: dict[str, Any]) -> Head:
    """An ASGI HTTP scope's `Head`."""
    client = scope.get("client")
    return Head(
        scope["method"], scope["path"], scope.get("query_string") or b"", scope["headers"],
        client[0] if client else None,
    )


def first_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header `name` (lower-case), as the framework reads one."""
    for key, value in headers:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class FastRefusals:
    """The decisions of the fast path (no I/O) and its thin ASGI shell (`__call__`)."""

    #: Distinct rendered refusals kept (a per-key refusal's message names a count).
    CACHE_SIZE = 64
    #: Refusals being sent at once; the others wait their turn, parked (see `__call__`).
    TURNS = 2
    #: Longest wait for a turn: past it a refusal is sent anyway (a client that does not
    #: read can hold a turn until its write deadline; it must not hold up the others).
    TURN_WAIT_SECONDS = 0.5

    def __init__(
        self,
        quart_app: Quart,
        service: GenerationService,
        authenticator: Authenticator,
        metrics: Metrics,
        *,
        max_body_bytes: int,
        body_timeout_seconds: float,
        max_tokens_limit: int,
        enabled: bool = True,
    ) -> None:
        self.quart = quart_app
        self.service = service
        self.auth = authenticator
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_seconds = body_timeout_seconds
        self.routes = generation_routes(service, max_tokens_limit)
        #: Off (FAST_REFUSALS=false): every request goes through the framework.
        self.enabled = enabled
        self._answers: dict[tuple[object, ...], Answer] = {}
        self._turns = trio.CapacityLimiter(self.TURNS)

    # --- decisions (no I/O: the ASGI shell below and the connection layer's raw path,
    # server.py, both ask them) ---

    def route(self, head: Head) -> GenerationRoute | None:
        """The covered route of this request if the fast path may answer it now."""
        if not self.enabled or head.method != "POST":
            return None
        route = self.routes.get(head.path)
        if route is None or not self.service.may_refuse():
            return None
        if route.resumable and (
            head.query_string or first_header(head.headers, b"last-event-id") is not None
        ):
            return None  # maybe a reconnect: the route decides
        return route

    def identify(self, head: Head) -> Identity | None:
        """Who the request acts as, if the auth hook would accept it (see the module
        docstring); the headers as the hook reads them (the last of repeated ones)."""
        if not self.auth.enabled:
            return ANONYMOUS_IDENTITY
        headers = {
            bytes(k).decode("latin-1"): bytes(v).decode("latin-1") for k, v in head.headers
        }
        return self.auth.identify(headers, client=head.client)

    def may_read_body(self, head: Head) -> bool:
        """A JSON body that is not announced as too large (the route answers 415, 413)."""
        if not is_json_content_type(first_header(head.headers, b"content-type")):
            return False
        length = first_header(head.headers, b"content-length")
        return length is None or (length.isdigit() and int(length) <= self.max_body_bytes)

    def admit(self, head: Head) -> tuple[GenerationRoute, Identity] | None:
        """Before the body: the route and who asks, if the fast path may read the body
        and decide (steps 1 to 3 of the module docstring), else None (hand on)."""
        route = self.route(head)
        if route is None:
            return None
        identity = self.identify(head)
        if identity is None or not self.may_read_body(head):
            return None
        return route, identity

    def decide(self, head: Head, body: bytes, rid: str) -> Refusal | None:
        """The whole decision for a request already read (the raw path): the refusal
        the framework path would answer with now, or None (hand on)."""
        admitted = self.admit(head)
        if admitted is None:
            return None
        route, identity = admitted
        error = self.refusal(route, body, rid, identity)
        return None if error is None else Refusal(route, identity, error)

    def refusal(
        self, route: GenerationRoute, body: bytes, rid: str, identity: Identity
    ) -> DomainError | None:
        """The refusal the framework path would answer with now, or None (hand on)."""
        if not body:
            return None
        try:
            request = route.parse(jsonparse.loads(body), rid)
        except Exception:  # the route gives its own answer to any of them
            return None
        return self.service.refusal(
            request, owner=identity.owner, priority_class=identity.priority_class
        )

    async def answer(self, error: DomainError, dialect: Dialect) -> Answer:
        """The framework's response to `error`, rendered by it once per distinct error.
        Cancellation: nothing is cached."""
        key = (
            type(error),
            error.code,
            error.message,
            error.param,
            error.retry_after,
            repr(error.details),
            dialect,
        )
        cached = self._answers.get(key)
        if cached is not None:
            return cached
        async with self.quart.app_context():
            response = error_response(error, dialect)
        body = await response.get_data(as_text=False)
        headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in response.headers.items()
        ]
        answer = Answer(response.status_code, headers, body)
        if len(self._answers) >= self.CACHE_SIZE:
            self._answers.clear()
        self._answers[key] = answer
        return answer

    # --- I/O ---

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any, app: ASGIApp) -> None:
        """Answer the request's refusal, or call `app` with it (its body replayed).

        Refusals are sent `TURNS` at a time. A storm otherwise keeps about one runnable
        task per connection in trio's run queue, and trio runs every runnable task once
        per scheduling round: each step of the running streams (a decode step's return,
        a token's way to its socket) waited behind all of them, and their tok/s fell by
        half or more. Parked on a limiter, waiting refusals are not runnable; the CPU
        they need is the same. A turn is waited for at most TURN_WAIT_SECONDS.

        Cancellation (the client gone): the request ends here as it would in the
        framework; nothing is held."""
        admitted = self.admit(scope_head(scope))
        if admitted is None:
            await app(scope, receive, send)
            return
        route, identity = admitted
        messages, body = await self._read_body(receive)
        error = None
        if body is not None:
            error = self.refusal(route, body, str(scope[REQUEST_ID_SCOPE_KEY]), identity)
        if error is None:
            await app(scope, replay(messages, receive), send)
            return
        scope[ROUTE_SCOPE_KEY] = route.path  # what the request log and metrics say
        scope[IDENTITY_SCOPE_KEY] = identity
        answer = await self.answer(error, route.dialect)
        self.metrics.on_fast_refusal()
        async with self.turn():
            await send(
                {"type": "http.response.start", "status": answer.status, "headers": answer.headers}
            )
            await send({"type": "http.response.body", "body": answer.body})

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """A turn to send a refusal (see `__call__`), waited for at most
        TURN_WAIT_SECONDS; the raw path (server.py) takes one too, from the same
        limiter. A free turn is taken without a checkpoint (what is sent next is one).
        Cancellation: a turn taken is given back."""
        turn = False
        try:
            self._turns.acquire_nowait()  # a free turn: no cancel scope (a storm's cost)
            turn = True
        except trio.WouldBlock:
            with trio.move_on_after(self.TURN_WAIT_SECONDS):
                await self._turns.acquire()
                turn = True
        try:
            yield
        finally:
            if turn:
                self._turns.release()

    async def _read_body(self, receive: Any) -> tuple[list[Message], bytes | None]:
        """The request's messages as received, and its body: None if it is larger than
        MAX_BODY_BYTES, not all there within BODY_TIMEOUT_SECONDS, or the client left
        (the framework then answers as it does)."""
        messages: list[Message] = []
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(self.body_timeout_seconds):
            while True:
                message: Message = await receive()
                messages.append(message)
                if message["type"] != "http.request":
                    return messages, None
                chunk = bytes(message.get("body", b""))
                size += len(chunk)
                if size > self.max_body_bytes:
                    return messages, None
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return messages, b"".join(chunks)
        return messages, None


def replay(messages: list[Message], receive: Any) -> Callable[[], Awaitable[Message]]:
    """A `receive` that gives `messages` again, then what `receive` gives."""
    pending = deque(messages)

    async def replaying() -> Message:
        if pending:
            return pending.popleft()
        message: Message = await receive()
        return message

    return replaying
