"""Refusals answered from the raw bytes of a request, before the HTTP server parses it.

The fast path (api/refusals.py) still pays for Hypercorn's HTTP/1 machinery per
request: h11 in pure Python, a task, an ASGI scope and channels. While some model
refuses someone, the connection layer (`server.GuardedTCPServer`) shows the bytes it
read from an idle keep-alive connection to `RawRefusals.reply()` first:

1. `parse_request` accepts only exactly one complete, simple HTTP/1.1 request: `POST`
   to a covered path, one `Host`, one `Content-Length` and that many body bytes,
   nothing after them; no `Transfer-Encoding`, `Expect`, `Upgrade`, a `Connection`
   that is `close` or `keep-alive` if any, every header as h11 would accept it. It is
   parsed by httptools (llhttp, compiled) and checked against h11's grammar, so the
   server never answers a request h11 would have refused.
2. The decision is the fast path's own (`FastRefusals.decide`: the route, credentials,
   the body by the route's parser, `GenerationService.refusal()`), after the `Host`
   check the app makes first (`HostAllowlist`).
3. The answer is the fast path's (rendered by the framework once per distinct error)
   with what the request observer adds (`X-Request-Id`, the client's or a new one) and
   what Hypercorn adds (its `date` and `server` headers, h11's `Connection: close`
   when the request asked for it), written by h11 itself once per template
   (`ResponseTemplates`): the same bytes as the framework path's answer.

Anything else (`None`) goes to Hypercorn untouched. No I/O here: the caller passes the
bytes, the client's address and Hypercorn's response headers, and writes the reply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import h11
import httptools

from ..metrics import Metrics
from .auth_hook import IDENTITY_SCOPE_KEY
from .host_check import HostAllowlist
from .refusals import Answer, FastRefusals, Head, Refusal
from .request_log import RequestObserver, request_id_of

Headers = list[tuple[bytes, bytes]]

#: RFC 9110 token (h11's header name rule).
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
#: A header value as h11 accepts it, without surrounding whitespace (which both strip).
_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
#: An origin-form target without percent-escapes (its decoded path is itself).
_TARGET = re.compile(rb"/[\x21-\x23\x26-\x7e]*")
#: Headers that make a request anything but simple: the framework path handles them.
_NOT_SIMPLE = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"http2-settings"))
_PREFIX = b"POST /"


@dataclass(frozen=True, slots=True)
class RawRequest:
    """One complete simple request (see `parse_request`)."""

    head: Head
    body: bytes
    #: The client asked to close the connection after the answer (`Connection: close`).
    close: bool


class _Collector:
    """httptools' callbacks: the request's parts."""

    __slots__ = ("begun", "body", "complete", "headers", "url")

    def __init__(self) -> None:
        self.begun = 0
        self.complete = 0
        self.url = b""
        self.headers: Headers = []
        self.body = b""

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1


def parse_request(
    data: bytes, *, client: str | None, max_head_bytes: int, max_body_bytes: int
) -> RawRequest | None:
    """`data` as one complete simple HTTP/1.1 request (the module docstring, step 1),
    or None: anything else, or any doubt."""
    if not data.startswith(_PREFIX):
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > max_head_bytes:
        return None
    collector = _Collector()
    parser = httptools.HttpRequestParser(collector)
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # a callback's error too
        return None
    if collector.begun != 1 or collector.complete != 1 or parser.get_http_version() != "1.1":
        return None
    headers: Headers = []
    host = length = 0
    close = False
    for raw_name, value in collector.headers:
        name = raw_name.lower()
        if (name in _NOT_SIMPLE or _TOKEN.fullmatch(raw_name) is None
                or _VALUE.fullmatch(value) is None):
            return None
        if name == b"host":
            host += 1
        elif name == b"content-length":
            length += 1
            if not value.isdigit() or int(value) != len(collector.body):
                return None
        elif name == b"connection":
            token = value.lower()
            if token not in (b"close", b"keep-alive"):
                return None
            close = token == b"close"
        headers.append((name, value))
    body = collector.body
    if (host != 1 or length != 1 or len(body) > max_body_bytes
            or end + 4 + len(body) != len(data)):  # nothing before or after the message
        return None
    if _TARGET.fullmatch(collector.url) is None:
        return None
    path, _, query = collector.url.partition(b"?")
    return RawRequest(Head("POST", path.decode("ascii"), query, headers, client), body, close)


def render_response(status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes, *,
                    close: bool) -> bytes:
    """The bytes h11 writes for this response to a simple HTTP/1.1 request (with
    `Connection: close` if `close`), as Hypercorn sends it (head, body, end)."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n"
        + (b"connection: close\r\n" if close else b"") + b"\r\n"
    )
    while connection.next_event() is not h11.NEED_DATA and connection.their_state is not h11.DONE:
        pass
    stripped = [(bytes(name).strip(), bytes(value).strip()) for name, value in headers]
    return b"".join(
        connection.send(event) or b""
        for event in (
            h11.Response(status_code=status, headers=stripped),
            h11.Data(data=body),
            h11.EndOfMessage(),
        )
    )


class ResponseTemplates:
    """An answer's wire bytes, rendered by h11 once per answer, `close` and Hypercorn
    headers (the date moves once a second), with a gap where the request id goes."""

    #: A stand-in request id, cut out of the rendered bytes.
    GAP = b"fabricai-raw-request-id"
    SIZE = 64

    def __init__(self) -> None:
        self._templates: dict[tuple[int, bool, tuple[tuple[bytes, bytes], ...]],
                              tuple[Answer, list[bytes], str | None]] = {}

    def wire(self, answer: Answer, rid: str, *, close: bool, extra: Headers) -> tuple[bytes, str]:
        """The response's bytes and the request id it carries (the answer's own, if it
        names one, as the request observer keeps it)."""
        key = (id(answer), close, tuple(extra))
        template = self._templates.get(key)
        if template is None or template[0] is not answer:
            own = [v for k, v in answer.headers if k.lower() == b"x-request-id"]
            headers = [*answer.headers, *(() if own else ((b"x-request-id", self.GAP),)), *extra]
            data = render_response(answer.status, headers, answer.body, close=close)
            if len(self._templates) >= self.SIZE:
                self._templates.clear()
            template = (answer, data.split(self.GAP) if not own else [data],
                        own[0].decode("latin-1") if own else None)
            self._templates[key] = template
        _, parts, own_id = template
        if own_id is not None:
            return parts[0], own_id
        return rid.encode("latin-1").join(parts), rid


@dataclass(slots=True)
class RawReply:
    """A refusal to write: the bytes, and what the request observer records after."""

    data: bytes
    status: int
    close: bool
    rid: str
    refusal: Refusal


class RawRefusals:
    """The decisions of the raw path (see the module docstring); no I/O."""

    def __init__(self, fast: FastRefusals, hosts: HostAllowlist, observer: RequestObserver,
                 metrics: Metrics, *, enabled: bool = True) -> None:
        self.fast = fast
        self.hosts = hosts
        self.observer = observer
        self.metrics = metrics
        #: Off (RAW_REFUSALS=false, or FAST_REFUSALS=false): every request to Hypercorn.
        self.enabled = enabled
        self.templates = ResponseTemplates()
        #: Refusals answered here (also in `fabricai_fast_refusals_total`): for tests.
        self.answered = 0

    def wanted(self, data: bytes | bytearray) -> bool:
        """Whether `data` may be a request to refuse now (a few comparisons)."""
        return (self.enabled and self.fast.enabled and data.startswith(_PREFIX)
                and self.fast.service.may_refuse())

    def decide(self, data: bytes, *, client: str | None, max_head_bytes: int
               ) -> tuple[RawRequest, Refusal, str] | None:
        """The request, its refusal and request id if `data` is one simple request the
        framework path would refuse now; else None."""
        request = parse_request(data, client=client, max_head_bytes=max_head_bytes,
                                max_body_bytes=self.fast.max_body_bytes)
        if request is None:
            return None
        head = request.head
        if not self.hosts.allows_scope({"path": head.path, "headers": head.headers}):
            return None  # the app's host check answers
        rid = request_id_of(head.headers)
        refusal = self.fast.decide(head, request.body, rid)
        return None if refusal is None else (request, refusal, rid)

    async def reply(self, data: bytes, *, client: str | None, max_head_bytes: int,
                    extra_headers: Headers) -> RawReply | None:
        """The refusal's bytes, or None (hand `data` to Hypercorn). `extra_headers`:
        what Hypercorn adds to a response (`Config.response_headers("h11")`).
        Checkpoints only to render an answer not rendered before."""
        decided = self.decide(data, client=client, max_head_bytes=max_head_bytes)
        if decided is None:
            return None
        request, refusal, rid = decided
        answer = await self.fast.answer(refusal.error, refusal.route.dialect)
        wire, rid = self.templates.wire(answer, rid, close=request.close, extra=extra_headers)
        self.metrics.on_fast_refusal()
        self.answered += 1
        return RawReply(wire, answer.status, request.close, rid, refusal)

    def ended(self, reply: RawReply, seconds: float, now: float) -> None:
        """Metrics and the log line, as the request observer records any request
        (`now`: monotonic)."""
        scope = {"method": "POST", IDENTITY_SCOPE_KEY: reply.refusal.identity}
        self.observer.ended(scope, reply.rid, reply.refusal.route.path, reply.status,
                            seconds, now)
