"""api/raw_refusals.py without sockets: which bytes are one simple request, and the
response bytes h11 would write (the answers themselves: tests/test_fast_refusals.py)."""

from __future__ import annotations

import h11
import pytest

from fabricai_trio.api.raw_refusals import ResponseTemplates, parse_request, render_response
from fabricai_trio.api.refusals import Answer

BODY = b'{"prompt": "hi", "max_tokens": 4}'


def request(*headers: bytes, body: bytes = BODY, line: bytes = b"POST /v1/completions HTTP/1.1",
            length: bool = True) -> bytes:
    head = [line, b"Host: 127.0.0.1:8000", b"Content-Type: application/json", *headers]
    if length:
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def parse(data: bytes, *, max_body_bytes: int = 1024) -> object:
    return parse_request(data, client="10.0.0.1", max_head_bytes=4096,
                         max_body_bytes=max_body_bytes)


def test_one_simple_request_is_parsed_as_asgi_would_give_it() -> None:
    parsed = parse(request(b"X-Request-Id: abc", b"Connection: keep-alive"))
    assert parsed is not None
    head = parsed.head  # type: ignore[attr-defined]
    assert (head.method, head.path, head.query_string, head.client) == (
        "POST", "/v1/completions", b"", "10.0.0.1")
    assert head.headers == [
        (b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
        (b"x-request-id", b"abc"), (b"connection", b"keep-alive"),
        (b"content-length", str(len(BODY)).encode()),
    ]
    assert parsed.body == BODY  # type: ignore[attr-defined]
    assert parsed.close is False  # type: ignore[attr-defined]
    closing = parse(request(b"Connection: Close"))
    assert closing is not None and closing.close is True  # type: ignore[attr-defined]
    with_query = parse(request(line=b"POST /v1/inference_sse?x=1 HTTP/1.1"))
    assert with_query is not None
    assert (with_query.head.path, with_query.head.query_string) == (  # type: ignore[attr-defined]
        "/v1/inference_sse", b"x=1")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(request(b"Transfer-Encoding: chunked", length=False,
                             body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)), id="chunked"),
        pytest.param(request(b"Expect: 100-continue"), id="expect"),
        pytest.param(request(b"Upgrade: h2c", b"Connection: Upgrade"), id="upgrade"),
        pytest.param(request(b"Connection: keep-alive, Upgrade"), id="connection-other"),
        pytest.param(request() + request(), id="pipelined"),
        pytest.param(request() + b"GET", id="bytes-after"),
        pytest.param(request()[:-5], id="body-short"),
        pytest.param(request()[:40], id="head-partial"),
        pytest.param(request(line=b"POST /v1/completions HTTP/1.0"), id="http-1.0"),
        pytest.param(request(line=b"GET /v1/completions HTTP/1.1", length=False, body=b""),
                     id="get"),
        pytest.param(request(line=b"POST /v1/%63ompletions HTTP/1.1"), id="escaped-path"),
        pytest.param(request(line=b"POST http://x/v1/completions HTTP/1.1"), id="absolute"),
        pytest.param(request(b"Host: other"), id="two-hosts"),
        pytest.param(request().replace(b"Host: 127.0.0.1:8000\r\n", b""), id="no-host"),
        pytest.param(request(b"Content-Length: 3"), id="two-lengths"),
        pytest.param(request(length=False), id="no-length"),
        pytest.param(request(b"X-Bad: a\x01b"), id="control-in-value"),
        pytest.param(request(b"X-Folded: a\r\n b"), id="obs-fold"),
        pytest.param(request(b"Bad Name: x"), id="space-in-name"),
        pytest.param(request(body=b"x" * 2000), id="body-too-large"),
        pytest.param(request(b"X-Long: " + b"a" * 5000), id="head-too-large"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="h2-preface"),
        pytest.param(b"", id="empty"),
    ],
)
def test_anything_else_is_left_to_the_http_server(data: bytes) -> None:
    assert parse(data) is None


def test_the_response_is_h11s_and_the_request_id_goes_in_its_place() -> None:
    answer = Answer(429, [(b"content-type", b"application/json"),
                          (b"content-length", b"2"), (b"retry-after", b"3")], b"{}")
    extra = [(b"date", b"Tue, 01 Dec 2026 21:00:00 GMT"), (b"server", b"hypercorn-h11")]
    templates = ResponseTemplates()
    for close in (False, True):
        wire, rid = templates.wire(answer, "rid-1", close=close, extra=extra)
        # What h11 writes for a request read and answered as Hypercorn answers it.
        server = h11.Connection(h11.SERVER)
        server.receive_data(request(*((b"Connection: close",) if close else ())))
        while server.next_event() is not h11.NEED_DATA and server.their_state is not h11.DONE:
            pass
        expected = b"".join(server.send(event) or b"" for event in (
            h11.Response(status_code=429, headers=[*answer.headers,
                                                   (b"x-request-id", b"rid-1"), *extra]),
            h11.Data(data=b"{}"), h11.EndOfMessage()))
        assert (wire, rid) == (expected, "rid-1")
        assert (b"connection: close\r\n" in wire.lower()) is close
        assert templates.wire(answer, "other", close=close, extra=extra)[0] == wire.replace(
            b"rid-1", b"other")
    own = Answer(429, [*answer.headers, (b"x-request-id", b"its-own")], b"{}")
    wire, rid = templates.wire(own, "rid-1", close=False, extra=extra)
    assert rid == "its-own" and wire == render_response(429, [*own.headers, *extra], b"{}",
                                                        close=False)
