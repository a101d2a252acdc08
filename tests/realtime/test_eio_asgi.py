"""Engine.IO transport tests: `EngineIOApp` driven as an ASGI app with hand-made messages."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from fabricai_trio.realtime.asgi import PrefixDispatcher
from fabricai_trio.realtime.config import RealtimeConfig
from fabricai_trio.realtime.conformance import EchoHandler
from fabricai_trio.realtime.eio_app import EngineIOApp
from fabricai_trio.realtime.eio_session import CloseReason
from fabricai_trio.realtime.eio_socket import EngineIOSocket

from .asgi_harness import HttpCall, http, make_scope, ws_call

REF = RealtimeConfig.reference()


class Recorder(EchoHandler):
    """Echo, and remember sockets, ends, and whether spawned work got cancelled."""

    def __init__(self) -> None:
        self.sockets: list[EngineIOSocket] = []
        self.ended: list[CloseReason] = []
        self.cancelled_tasks = 0
        self.connected = trio.Event()

    async def run_session(self, socket: EngineIOSocket) -> None:
        self.sockets.append(socket)
        socket.spawn(self._forever)
        self.connected.set()
        await super().run_session(socket)

    async def _forever(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled_tasks += 1

    async def session_ended(self, socket: EngineIOSocket, reason: CloseReason) -> None:
        self.ended.append(reason)


@pytest.fixture
async def handler() -> Recorder:
    return Recorder()


@pytest.fixture
async def app(handler: Recorder) -> AsyncIterator[EngineIOApp]:
    app = EngineIOApp(handler, REF)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        yield app
        nursery.cancel_scope.cancel()


async def open_polling(app: EngineIOApp) -> str:
    r = await http(app, "EIO=4&transport=polling")
    assert r.status == 200
    sid: str = json.loads(r.text[1:])["sid"]
    return sid


def q(sid: str) -> str:
    return f"EIO=4&transport=polling&sid={sid}"


async def test_polling_handshake(app: EngineIOApp) -> None:
    r = await http(app, "EIO=4&transport=polling&t=x")
    assert r.status == 200
    assert r.headers[b"content-type"].startswith(b"text/plain")
    assert r.text[0] == "0"
    info = json.loads(r.text[1:])
    assert set(info) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
    assert info["upgrades"] == ["websocket"] and info["pingInterval"] == 300


@pytest.mark.parametrize(
    ("method", "query", "code"),
    [
        ("GET", "transport=polling", 5),
        ("GET", "EIO=abc&transport=polling", 5),
        ("GET", "EIO=4", 0),
        ("GET", "EIO=4&transport=abc", 0),
        ("GET", "EIO=4&transport=websocket", 3),  # a websocket handshake without a websocket
        ("POST", "EIO=4&transport=polling", 2),
        ("PUT", "EIO=4&transport=polling", 2),
        ("GET", "EIO=4&transport=polling&sid=nope", 1),
    ],
)
async def test_bad_requests_are_400(app: EngineIOApp, method: str, query: str, code: int) -> None:
    r = await http(app, query, method=method)
    assert r.status == 400
    assert r.json()["code"] == code


async def test_wrong_path_is_404(app: EngineIOApp) -> None:
    r = await http(app, "EIO=4&transport=polling", path="/socket.io/extra")
    assert r.status == 404


async def test_cors_headers_and_preflight(handler: Recorder) -> None:
    origin = (b"origin", b"http://example.com")
    app = EngineIOApp(handler, RealtimeConfig(cors_origins=("http://example.com",)))
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        r = await http(app, "EIO=4&transport=polling", headers=[origin])
        assert r.status == 200
        assert r.headers[b"access-control-allow-origin"] == b"http://example.com"
        assert r.headers[b"access-control-allow-credentials"] == b"true"
        pre = await http(
            app,
            "EIO=4&transport=polling",
            method="OPTIONS",
            headers=[origin, (b"access-control-request-headers", b"content-type")],
        )
        assert pre.status == 204
        assert b"POST" in pre.headers[b"access-control-allow-methods"]
        bad = await http(app, "EIO=4&transport=polling", headers=[(b"origin", b"http://evil")])
        assert bad.status == 403
        ws = ws_call(app, "EIO=4&transport=websocket", headers=[(b"origin", b"http://evil")])
        await ws.run()
        assert not ws.accepted and ws.close_code == 1008
        nursery.cancel_scope.cancel()


async def test_same_origin_policy_by_default(handler: Recorder) -> None:
    app = EngineIOApp(handler, RealtimeConfig())
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        same = await http(
            app, "EIO=4&transport=polling", headers=[(b"origin", b"http://localhost")]
        )
        assert same.status == 200
        other = await http(app, "EIO=4&transport=polling", headers=[(b"origin", b"http://x.org")])
        assert other.status == 403
        nursery.cancel_scope.cancel()


async def test_echo_and_burst_of_50_over_polling(app: EngineIOApp) -> None:
    sid = await open_polling(app)
    r = await http(app, q(sid), method="POST", body="\x1e".join(f"4m{i}" for i in range(50)))
    assert (r.status, r.text) == (200, "ok")
    received: list[str] = []
    while len(received) < 50:
        got = await http(app, q(sid))
        received += got.text.split("\x1e")
    assert received == [f"4m{i}" for i in range(50)]


async def test_binary_round_trip_over_polling(app: EngineIOApp) -> None:
    sid = await open_polling(app)
    await http(app, q(sid), method="POST", body="4hello\x1ebAQIDBA==")
    assert (await http(app, q(sid))).text == "4hello\x1ebAQIDBA=="


async def test_chunked_body_over_max_payload_is_413_at_once(handler: Recorder) -> None:
    app = EngineIOApp(handler, RealtimeConfig(max_payload_bytes=1024))
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        sid = await open_polling(app)
        # the client keeps the body open: the 413 must not wait for its end
        call = HttpCall(
            app, make_scope("http", q(sid), method="POST"), [b"4" + b"x" * 600], more_body=True
        )
        nursery.start_soon(call.run)
        await call.send_chunk(b"x" * 600)
        with trio.fail_after(2):
            await call.done.wait()
        assert call.status == 413
        assert (await http(app, q(sid))).status == 400  # and the session is gone
        nursery.cancel_scope.cancel()


async def test_content_length_over_max_payload_is_413_before_reading(app: EngineIOApp) -> None:
    sid = await open_polling(app)
    scope = make_scope("http", q(sid), method="POST", headers=[(b"content-length", b"2000000")])
    call = HttpCall(app, scope, [], more_body=True)
    with trio.fail_after(2):
        await call.run()
    assert call.status == 413


async def test_invalid_packet_is_400_and_closes(app: EngineIOApp, handler: Recorder) -> None:
    sid = await open_polling(app)
    assert (await http(app, q(sid), method="POST", body="abc")).status == 400
    assert (await http(app, q(sid))).status == 400
    await trio.testing.wait_all_tasks_blocked()
    assert handler.ended == [CloseReason.PARSE_ERROR]
    assert handler.cancelled_tasks == 1


async def test_duplicate_get_is_400_and_first_gets_close(app: EngineIOApp) -> None:
    sid = await open_polling(app)
    async with trio.open_nursery() as nursery:
        first = HttpCall(app, make_scope("http", q(sid)))
        nursery.start_soon(first.run)
        await trio.testing.wait_all_tasks_blocked()
        second = await http(app, q(sid) + "&t=burst")
        assert second.status == 400
        with trio.fail_after(2):
            await first.done.wait()
    assert (first.status, first.body) == (200, b"1")
    assert (await http(app, q(sid))).status == 400


async def test_duplicate_post_is_400_and_closes(app: EngineIOApp) -> None:
    sid = await open_polling(app)
    async with trio.open_nursery() as nursery:
        first = HttpCall(app, make_scope("http", q(sid), method="POST"), [b"4a"], more_body=True)
        nursery.start_soon(first.run)
        await trio.testing.wait_all_tasks_blocked()
        assert (await http(app, q(sid), method="POST", body="4b")).status == 400
        await first.send_chunk(b"", more=False)
    assert (await http(app, q(sid))).status == 400


async def test_client_close_answers_pending_get_with_noop(
    app: EngineIOApp, handler: Recorder
) -> None:
    sid = await open_polling(app)
    async with trio.open_nursery() as nursery:
        pending = HttpCall(app, make_scope("http", q(sid)))
        nursery.start_soon(pending.run)
        await trio.testing.wait_all_tasks_blocked()
        assert (await http(app, q(sid), method="POST", body="1")).status == 200
        with trio.fail_after(2):
            await pending.done.wait()
    assert pending.body == b"6"
    assert (await http(app, q(sid))).status == 400
    await trio.testing.wait_all_tasks_blocked()
    assert handler.ended == [CloseReason.CLIENT_CLOSE]


async def test_disconnect_during_held_get_closes_session(
    app: EngineIOApp, handler: Recorder
) -> None:
    sid = await open_polling(app)
    async with trio.open_nursery() as nursery:
        pending = HttpCall(app, make_scope("http", q(sid)))
        nursery.start_soon(pending.run)
        await trio.testing.wait_all_tasks_blocked()
        await pending.disconnect()
        with trio.fail_after(2):
            await pending.done.wait()
    assert pending.status is None
    assert (await http(app, q(sid))).status == 400
    await trio.testing.wait_all_tasks_blocked()
    assert handler.ended == [CloseReason.TRANSPORT_CLOSE]
    assert handler.cancelled_tasks == 1


async def test_upgrade_flow(app: EngineIOApp, handler: Recorder) -> None:
    sid = await open_polling(app)
    socket = handler.sockets[0]
    async with trio.open_nursery() as nursery:
        pending = HttpCall(app, make_scope("http", q(sid)))
        nursery.start_soon(pending.run)
        await trio.testing.wait_all_tasks_blocked()
        ws = ws_call(app, f"EIO=4&transport=websocket&sid={sid}")
        await nursery.start(ws.run)
        await ws.send("2probe")
        assert await ws.receive() == "3probe"
        with trio.fail_after(2):
            await pending.done.wait()
        assert pending.body == b"6"
        assert (await http(app, q(sid))).body == b"6"  # until the upgrade completes
        socket.send("buffered-1")
        socket.send(b"\x02")
        await ws.send("5")
        assert await ws.receive() == "4buffered-1"
        assert await ws.receive() == b"\x02"
        assert (await http(app, q(sid))).status == 400  # polling after upgrade
        assert (await http(app, q(sid), method="POST", body="4x")).status == 400
        await ws.send("4hello")
        assert await ws.receive() == "4hello"
        # a second websocket: accepted, then closed (the reference server's answer)...
        other = ws_call(app, f"EIO=4&transport=websocket&sid={sid}")
        await other.run()
        assert other.accepted and other.close_code == 1002
        await ws.send("4still")
        assert await ws.receive() == "4still"  # ...without harm to the first
        await ws.disconnect()
        await ws.wait_closed()
    await trio.testing.wait_all_tasks_blocked()
    assert handler.ended == [CloseReason.TRANSPORT_CLOSE]


async def test_websocket_refusals_are_http_answers_when_the_server_can_send_them(
    app: EngineIOApp,
) -> None:
    """With the denial-response extension a refused websocket gets the reference
    server's HTTP 400 (and our JSON error body); without it, ASGI's 403."""
    unknown = ws_call(app, "EIO=4&transport=websocket&sid=nope", denial=True)
    await unknown.run()
    assert not unknown.accepted and unknown.denied is not None
    assert unknown.denied.status == 400 and unknown.denied.json()["code"] == 1
    bad_version = ws_call(app, "EIO=3&transport=websocket", denial=True)
    await bad_version.run()
    assert bad_version.denied is not None and bad_version.denied.json()["code"] == 5
    plain = ws_call(app, "EIO=4&transport=websocket&sid=nope")
    await plain.run()
    assert not plain.accepted and plain.close_code == 1002 and plain.denied is None


async def test_websocket_with_transport_polling_is_accepted_then_closed(app: EngineIOApp) -> None:
    sid = await open_polling(app)
    for query in ("EIO=4&transport=polling", f"EIO=4&transport=polling&sid={sid}"):
        ws = ws_call(app, query, denial=True)
        await ws.run()
        assert ws.accepted and ws.close_code == 1002 and ws.denied is None
    assert (await http(app, q(sid), method="POST", body="4still")).text == "ok"
    assert (await http(app, q(sid))).text == "4still"  # the session is unharmed


async def test_post_body_timeout_is_408_and_the_session_lives_on(
    handler: Recorder, autojump_clock: trio.testing.MockClock
) -> None:
    config = RealtimeConfig(body_timeout_ms=1000, ping_interval_ms=60_000)
    app = EngineIOApp(handler, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        sid = await open_polling(app)
        call = HttpCall(app, make_scope("http", q(sid), method="POST"), [b"4he"], more_body=True)
        nursery.start_soon(call.run)
        with trio.fail_after(config.body_timeout_s + 1):
            await call.done.wait()
        assert call.status == 408
        assert (await http(app, q(sid), method="POST", body="4hello")).text == "ok"
        assert (await http(app, q(sid))).text == "4hello"
        assert handler.ended == []
        nursery.cancel_scope.cancel()


async def test_websocket_session_echo_and_binary(app: EngineIOApp) -> None:
    async with trio.open_nursery() as nursery:
        ws = ws_call(app, "EIO=4&transport=websocket")
        await nursery.start(ws.run)
        handshake = await ws.receive()
        assert isinstance(handshake, str) and json.loads(handshake[1:])["upgrades"] == []
        await ws.send("4hello")
        assert await ws.receive() == "4hello"
        await ws.send(b"\x01\x02\x03\x04")
        assert await ws.receive() == b"\x01\x02\x03\x04"
        await ws.send("1")
        assert await ws.wait_closed() == 1000


async def test_websocket_invalid_packet_closes(app: EngineIOApp) -> None:
    async with trio.open_nursery() as nursery:
        ws = ws_call(app, "EIO=4&transport=websocket")
        await nursery.start(ws.run)
        await ws.receive()
        await ws.send("abc")
        assert await ws.wait_closed() == 1002


@pytest.mark.parametrize("query", ["transport=websocket", "EIO=abc&transport=websocket", "EIO=4"])
async def test_websocket_bad_query_is_refused(app: EngineIOApp, query: str) -> None:
    ws = ws_call(app, query)
    await ws.run()
    assert not ws.accepted and ws.close_code is not None


async def test_heartbeat_polling(
    app: EngineIOApp, handler: Recorder, autojump_clock: trio.testing.MockClock
) -> None:
    sid = await open_polling(app)
    for _ in range(3):
        assert (await http(app, q(sid))).text == "2"
        assert (await http(app, q(sid), method="POST", body="3")).status == 200
    await trio.sleep(0.3 + 0.2 + 0.01)  # no pong: pingInterval + pingTimeout later it is gone
    assert (await http(app, q(sid))).status == 400
    assert handler.ended == [CloseReason.PING_TIMEOUT]


async def test_heartbeat_websocket(
    app: EngineIOApp, handler: Recorder, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        ws = ws_call(app, "EIO=4&transport=websocket")
        await nursery.start(ws.run)
        await ws.receive()
        for _ in range(3):
            assert await ws.receive() == "2"
            await ws.send("3")
        assert await ws.receive() == "2"
        assert await ws.wait_closed() == 1000
    assert handler.ended == [CloseReason.PING_TIMEOUT]


async def test_slow_consumer_is_disconnected(handler: Recorder) -> None:
    app = EngineIOApp(handler, RealtimeConfig(max_buffered_packets=10))
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        sid = await open_polling(app)
        for i in range(11):
            handler.sockets[0].send(f"m{i}")
        assert (await http(app, q(sid))).status == 400
        await trio.testing.wait_all_tasks_blocked()
        assert handler.ended == [CloseReason.BUFFER_OVERFLOW]
        nursery.cancel_scope.cancel()


async def test_graceful_shutdown_sends_close(handler: Recorder) -> None:
    app = EngineIOApp(handler, REF)
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        sid = await open_polling(app)
        pending = HttpCall(app, make_scope("http", q(sid)))
        nursery.start_soon(pending.run)
        ws = ws_call(app, "EIO=4&transport=websocket")
        await nursery.start(ws.run)
        await ws.receive()
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(3):
            await app.shutdown()
        assert pending.body == b"1"
        assert await ws.receive() == "1"
        assert await ws.wait_closed() == 1000
        assert (await http(app, "EIO=4&transport=polling")).status == 503
    assert sorted(handler.ended) == [CloseReason.SERVER_SHUTDOWN] * 2
    assert (await http(app, q(sid))).json()["code"] == 1  # the session is forgotten


async def test_slow_application_pushes_back_on_post() -> None:
    """The POST is answered only once the application has taken enough messages."""
    release = trio.Event()
    taken: list[str | bytes] = []

    class Slow(EchoHandler):
        async def run_session(self, socket: EngineIOSocket) -> None:
            await release.wait()
            while True:
                taken.append(await socket.receive())

    app = EngineIOApp(Slow(), RealtimeConfig(max_inbound_backlog=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        sid = await open_polling(app)
        call = HttpCall(
            app,
            make_scope("http", q(sid), method="POST"),
            ["\x1e".join(f"4m{i}" for i in range(20)).encode()],
        )
        nursery.start_soon(call.run)
        await trio.testing.wait_all_tasks_blocked()
        assert call.status is None  # held: the application is behind
        release.set()
        with trio.fail_after(2):
            await call.done.wait()
        assert call.body == b"ok"
        await trio.testing.wait_all_tasks_blocked()
        assert taken == [f"m{i}" for i in range(20)]
        nursery.cancel_scope.cancel()


async def test_polling_needs_the_service_task(handler: Recorder) -> None:
    app = EngineIOApp(handler, REF)  # run() not started: no nursery for polling sessions
    assert (await http(app, "EIO=4&transport=polling")).status == 503


async def test_prefix_dispatcher_routes_and_falls_back(app: EngineIOApp) -> None:
    seen: list[str] = []

    async def fallback(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    dispatcher = PrefixDispatcher({"/socket.io/": app}, fallback=fallback)
    assert (await http(dispatcher, "EIO=4&transport=polling")).status == 200
    assert (await http(dispatcher, "", path="/v1/status")).status == 204
    assert seen == ["/v1/status"]
    bare = PrefixDispatcher({"/socket.io/": app})
    assert (await http(bare, "", path="/elsewhere")).status == 404


async def test_websocket_output_queued_during_a_write_is_not_stranded(
    handler: Recorder,
) -> None:
    """A frame queued while the writer is inside `send()` goes out without waiting for
    the next, unrelated output (a lost wakeup once held a Socket.IO `complete` event
    until the next ping, 25 s later)."""
    from .asgi_harness import WsCall

    release = trio.Event()
    writes = 0

    class SlowWs(WsCall):
        async def _send(self, message: dict[str, Any]) -> None:
            nonlocal writes
            if message["type"] == "websocket.send":
                writes += 1
                if writes == 2:  # the first frame after the handshake
                    await release.wait()
            await super()._send(message)

    app = EngineIOApp(handler, RealtimeConfig())  # default 25 s pings: no accidental wakeup
    async with trio.open_nursery() as nursery:
        await nursery.start(app.run)
        ws = SlowWs(app, make_scope("websocket", "EIO=4&transport=websocket"))
        await nursery.start(ws.run)
        await ws.receive()  # handshake
        await handler.connected.wait()
        socket = handler.sockets[0]
        socket.send("first")
        await trio.testing.wait_all_tasks_blocked()  # the writer is stuck in send()
        socket.send("second")
        release.set()
        with trio.fail_after(2):
            assert await ws.receive() == "4first"
            assert await ws.receive() == "4second"
        nursery.cancel_scope.cancel()
