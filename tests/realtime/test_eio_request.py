"""Sans-IO tests of request routing: `route()` on hand-made requests, no trio, no ASGI."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

from fabricai_trio.realtime.config import RealtimeConfig
from fabricai_trio.realtime.eio_request import (
    AttachWebsocket,
    Decision,
    Handshake,
    Poll,
    Post,
    Preflight,
    Refuse,
    Request,
    error_response,
    ok,
    route,
)
from fabricai_trio.realtime.eio_session import Transport
from fabricai_trio.realtime.errors import (
    Failure,
    LocalProtocolError,
    RemoteProtocolError,
    http_status_for,
)

CONFIG = RealtimeConfig(path="/socket.io/")
LIVE = "live-sid"


def request(
    query: Mapping[str, str],
    *,
    method: str = "GET",
    websocket: bool = False,
    path: str = "/socket.io/",
    origin: str | None = None,
    host: str | None = "testserver",
    content_length: str | None = None,
) -> Request:
    return Request(
        websocket=websocket,
        method=method,
        path=path,
        query=query,
        origin=origin,
        host=host,
        content_length=content_length,
    )


def decide(req: Request, *, config: RealtimeConfig = CONFIG, accepting: bool = True) -> Decision:
    return route(req, config, session_exists=lambda sid: sid == LIVE, accepting=accepting)


def refusal(decision: Decision) -> tuple[int, int, bool]:
    """(HTTP status, Engine.IO error code, accept_first) of a refusal."""
    assert isinstance(decision, Refuse), decision
    body = json.loads(decision.response.body)
    assert body["code"] == int(decision.error.code)
    assert decision.response.status == http_status_for(decision.error)
    return decision.response.status, body["code"], decision.accept_first


POLL = {"EIO": "4", "transport": "polling"}
WS = {"EIO": "4", "transport": "websocket"}


def test_polling_and_websocket_handshakes() -> None:
    assert decide(request(POLL)) == Handshake(transport=Transport.POLLING, cors=[])
    assert decide(request(WS, websocket=True)) == Handshake(transport=Transport.WEBSOCKET, cors=[])
    # `sid=` is no sid (the reference server tests `if (sid)`)
    assert isinstance(decide(request({**POLL, "sid": ""})), Handshake)


def test_requests_of_a_live_session() -> None:
    assert decide(request({**POLL, "sid": LIVE})) == Poll(sid=LIVE, cors=[])
    post = decide(request({**POLL, "sid": LIVE}, method="POST", content_length="12"))
    assert post == Post(sid=LIVE, content_length=12, cors=[])
    assert decide(request({**WS, "sid": LIVE}, websocket=True)) == AttachWebsocket(sid=LIVE)


@pytest.mark.parametrize(
    ("query", "method", "expected"),
    [
        # the reference test suite's handshake failures, with the reference server's codes
        ({"transport": "polling"}, "GET", (400, 5, False)),
        ({"EIO": "abc", "transport": "polling"}, "GET", (400, 5, False)),
        ({"EIO": "3", "transport": "polling"}, "GET", (400, 5, False)),
        ({"EIO": "4"}, "GET", (400, 0, False)),
        ({"EIO": "4", "transport": "abc"}, "GET", (400, 0, False)),
        (POLL, "POST", (400, 2, False)),
        (POLL, "PUT", (400, 2, False)),
        # a websocket handshake over plain HTTP (TRANSPORT_HANDSHAKE_ERROR)
        (WS, "GET", (400, 3, False)),
        ({**POLL, "sid": "nope"}, "GET", (400, 1, False)),
        ({**POLL, "sid": "nope"}, "POST", (400, 1, False)),
        # a live session asked over the wrong transport (TRANSPORT_MISMATCH)
        ({**WS, "sid": LIVE}, "GET", (400, 3, False)),
        ({**POLL, "sid": LIVE}, "PUT", (400, 3, False)),
    ],
)
def test_http_refusals_match_the_reference_server(
    query: dict[str, str], method: str, expected: tuple[int, int, bool]
) -> None:
    assert refusal(decide(request(query, method=method))) == expected


def test_eio_is_checked_at_the_handshake_only() -> None:
    """Like the reference server: requests of an open session are not re-checked."""
    assert decide(request({"transport": "polling", "sid": LIVE})) == Poll(sid=LIVE, cors=[])


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"transport": "websocket"}, (400, 5, False)),
        ({"EIO": "abc", "transport": "websocket"}, (400, 5, False)),
        ({"EIO": "4"}, (400, 0, False)),
        ({"EIO": "4", "transport": "abc"}, (400, 0, False)),
        ({**WS, "sid": "nope"}, (400, 1, False)),
        # `transport=polling` on a websocket: the reference server accepts, then closes
        (POLL, (400, 3, True)),
        ({**POLL, "sid": LIVE}, (400, 3, True)),
    ],
)
def test_websocket_refusals_match_the_reference_server(
    query: dict[str, str], expected: tuple[int, int, bool]
) -> None:
    assert refusal(decide(request(query, websocket=True))) == expected


def test_wrong_path_is_404() -> None:
    assert refusal(decide(request(POLL, path="/socket.io/extra"))) == (404, 3, False)
    assert isinstance(decide(request(POLL, path="/socket.io")), Handshake)


def test_not_accepting_is_503_for_handshakes_only() -> None:
    assert refusal(decide(request(POLL), accepting=False)) == (503, 3, False)
    assert refusal(decide(request(WS, websocket=True), accepting=False)) == (503, 3, False)
    assert isinstance(decide(request({**POLL, "sid": LIVE}), accepting=False), Poll)


@pytest.mark.parametrize("length", ["abc", "-1", "1.5"])
def test_invalid_content_length_is_400(length: str) -> None:
    req = request({**POLL, "sid": LIVE}, method="POST", content_length=length)
    assert refusal(decide(req)) == (400, 3, False)


def test_cors_same_origin_by_default() -> None:
    same = decide(request(POLL, origin="http://testserver"))
    assert isinstance(same, Handshake)
    assert (b"access-control-allow-origin", b"http://testserver") in same.cors
    foreign = decide(request(POLL, origin="http://evil.example"))
    assert refusal(foreign) == (403, 4, False)
    assert isinstance(foreign, Refuse)
    assert all(name != b"access-control-allow-origin" for name, _ in foreign.response.headers)
    # no Origin: not a browser, nothing to protect
    assert decide(request(POLL, origin=None, host=None)) == Handshake(
        transport=Transport.POLLING, cors=[]
    )


def test_cors_allow_list_and_wildcard() -> None:
    listed = RealtimeConfig(cors_origins=("http://good.example/",))
    assert isinstance(decide(request(POLL, origin="http://good.example"), config=listed), Handshake)
    assert refusal(decide(request(POLL, origin="http://x.example"), config=listed))[0] == 403
    # a websocket from a foreign origin is refused before the upgrade
    ws = decide(request(WS, websocket=True, origin="http://x.example"), config=listed)
    assert refusal(ws) == (403, 4, False)
    anyone = RealtimeConfig(cors_origins=("*",))
    assert isinstance(decide(request(POLL, origin="http://x.example"), config=anyone), Handshake)


def test_preflight() -> None:
    listed = RealtimeConfig(cors_origins=("http://good.example",))
    req = Request(
        websocket=False,
        method="OPTIONS",
        path="/socket.io/",
        origin="http://good.example",
        requested_headers="content-type, x-custom",
    )
    pre = decide(req, config=listed)
    assert isinstance(pre, Preflight)
    headers = dict(pre.response.headers)
    assert pre.response.status == 204
    assert headers[b"access-control-allow-origin"] == b"http://good.example"
    assert headers[b"access-control-allow-headers"] == b"content-type, x-custom"
    assert b"POST" in headers[b"access-control-allow-methods"]
    foreign = Request(websocket=False, method="OPTIONS", path="/socket.io/", origin="http://x")
    assert refusal(decide(foreign, config=listed)) == (403, 4, False)


def test_responses() -> None:
    cors = [(b"access-control-allow-origin", b"http://a")]
    answer = ok(cors, "4hello")
    assert (answer.status, answer.body) == (200, b"4hello")
    assert answer.headers[0][1].startswith(b"text/plain") and answer.headers[1:] == cors
    err = error_response(RemoteProtocolError("payload too large", failure=Failure.TOO_LARGE), cors)
    assert err.status == 413 and json.loads(err.body) == {"code": 3, "message": "payload too large"}
    assert error_response(LocalProtocolError("our bug")).status == 500
    assert json.loads(error_response(ValueError("x")).body)["message"] == "Internal error"


def test_request_validates_its_method() -> None:
    with pytest.raises(ValueError):
        Request(websocket=False, method="get", path="/socket.io/")
