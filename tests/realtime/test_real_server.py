"""End to end over a real Hypercorn trio server: raw-socket traps and python-socketio's
own synchronous `Client` (run in a worker thread)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import socketio
import trio
import websocket

from fabricai_trio.realtime.config import RealtimeConfig
from fabricai_trio.realtime.eio_app import EngineIOApp

from .servers import (
    Disconnects,
    RecordingEcho,
    body_of,
    get_request,
    hypercorn_server,
    raw_request,
    recording_reference_apps,
    status_of,
)


@dataclass
class Reference:
    host: str
    port: int
    echo: RecordingEcho  # the /engine.io/ application
    disconnects: Disconnects  # of the /socket.io/ application


@pytest.fixture
async def reference() -> AsyncIterator[Reference]:
    apps, echo, disconnects = recording_reference_apps()
    async with hypercorn_server(
        {"/engine.io/": apps.engineio, "/socket.io/": apps.socketio.asgi_app},
        apps.engineio,
        apps.socketio,
    ) as (host, port):
        yield Reference(host, port, echo, disconnects)


async def open_session(host: str, port: int, path: str = "/engine.io/") -> str:
    response = await raw_request(host, port, get_request(f"{path}?EIO=4&transport=polling"))
    assert status_of(response) == 200
    sid: str = json.loads(body_of(response)[1:])["sid"]
    return sid


# --- traps over real sockets -----------------------------------------------------------


async def test_chunked_body_over_max_payload_is_rejected_promptly(reference: Reference) -> None:
    host, port = reference.host, reference.port
    sid = await open_session(host, port)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        head = (
            f"POST /engine.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        await stream.send_all(head)
        chunk = b"4" + b"x" * 99_999
        for _ in range(11):  # 1.1 MB, and the body is never terminated
            await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        with trio.fail_after(10):  # hang guards: real sockets on a busy machine
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
    assert status_of(data) == 413
    with trio.fail_after(10):  # and the session is closed (a hang guard)
        assert await reference.echo.wait_ended(sid) == "parse error"


async def test_held_get_notices_the_client_leaving() -> None:
    # a long ping interval: only the disconnect can end this session
    echo = RecordingEcho()
    app = EngineIOApp(echo, RealtimeConfig(ping_interval_ms=60_000, path="/engine.io/"))
    async with hypercorn_server({"/engine.io/": app}, app) as (host, port):
        sid = await open_session(host, port)
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(get_request(f"/engine.io/?EIO=4&transport=polling&sid={sid}"))
        await trio.sleep(0.05)
        await stream.aclose()
        with trio.fail_after(5):
            assert await echo.wait_ended(sid) == "transport close"


async def test_websocket_origin_is_checked() -> None:
    app = EngineIOApp(RecordingEcho(), RealtimeConfig(cors_origins=("http://good.example",)))
    async with hypercorn_server({"/socket.io/": app}, app) as (host, port):
        url = f"ws://{host}:{port}/socket.io/?EIO=4&transport=websocket"

        def try_origin(origin: str) -> str:
            try:
                ws = websocket.create_connection(url, origin=origin, timeout=3)
            except websocket.WebSocketBadStatusException as exc:
                return f"refused {exc.status_code}"
            handshake = ws.recv()
            ws.close()
            assert isinstance(handshake, str)
            return handshake[0]

        assert await trio.to_thread.run_sync(try_origin, "http://evil.example") == "refused 403"
        assert await trio.to_thread.run_sync(try_origin, "http://good.example") == "0"


async def test_engineio_reference_upgrade_over_real_websocket(reference: Reference) -> None:
    host, port = reference.host, reference.port
    sid = await open_session(host, port)

    def upgrade() -> list[str | bytes]:
        ws = websocket.create_connection(
            f"ws://{host}:{port}/engine.io/?EIO=4&transport=websocket&sid={sid}", timeout=3
        )
        ws.send("2probe")
        out = [ws.recv()]
        ws.send("5")
        ws.send("4hello")
        out.append(ws.recv())
        ws.close()
        return out

    assert await trio.to_thread.run_sync(upgrade) == ["3probe", "4hello"]


async def test_second_websocket_after_upgrade_is_accepted_then_closed(
    reference: Reference,
) -> None:
    """The reference test suite's "ignores WebSocket connection with same sid after
    upgrade": the upgrade itself succeeds (HTTP 101), the server closes it at once,
    and the first websocket keeps working."""
    host, port = reference.host, reference.port
    sid = await open_session(host, port)
    url = f"ws://{host}:{port}/engine.io/?EIO=4&transport=websocket&sid={sid}"

    def second_after_upgrade() -> tuple[int, str | bytes]:
        first = websocket.create_connection(url, timeout=3)
        first.send("2probe")
        assert first.recv() == "3probe"
        first.send("5")
        second = websocket.create_connection(url, timeout=3)  # no exception: HTTP 101
        opcode, frame = second.recv_data(control_frame=True)
        code = int.from_bytes(frame[:2], "big") if opcode == websocket.ABNF.OPCODE_CLOSE else 0
        second.close()
        first.send("4hello")
        echoed = first.recv()
        first.close()
        return code, echoed

    assert await trio.to_thread.run_sync(second_after_upgrade) == (1002, "4hello")


async def test_websocket_with_an_unknown_sid_is_refused_with_400(reference: Reference) -> None:
    """As the reference server does (Hypercorn has the denial-response extension)."""
    url = f"ws://{reference.host}:{reference.port}/engine.io/?EIO=4&transport=websocket&sid=x"

    def connect() -> tuple[int, Any]:
        try:
            websocket.create_connection(url, timeout=3)
        except websocket.WebSocketBadStatusException as exc:
            return exc.status_code, json.loads(exc.resp_body or b"{}")
        raise AssertionError("the websocket was accepted")

    assert await trio.to_thread.run_sync(connect) == (
        400,
        {"code": 1, "message": "Session ID unknown"},
    )


# --- python-socketio's own client ------------------------------------------------------


def socketio_flow(url: str, transports: list[str]) -> dict[str, Any]:
    """What a stock `socketio.Client` sees against the reference server."""
    client = socketio.Client(reconnection=False)
    got: dict[str, Any] = {"auth": [], "back": [], "custom_auth": []}
    ready = threading.Event()

    @client.on("auth")
    def on_auth(data: Any) -> None:
        got["auth"].append(data)

    @client.on("message-back")
    def on_back(*args: Any) -> None:
        got["back"].append(list(args))
        if len(got["back"]) == 51:
            ready.set()

    @client.on("auth", namespace="/custom")
    def on_custom_auth(data: Any) -> None:
        got["custom_auth"].append(data)

    client.connect(
        url,
        transports=transports,
        auth={"token": "123"},
        namespaces=["/", "/custom"],
        wait_timeout=5,
    )
    try:
        got["ack"] = client.call("message-with-ack", (1, "2", {"3": [True]}), timeout=5)
        got["binary_ack"] = client.call("message-with-ack", (b"\x01\x02", "x"), timeout=5)
        client.emit("message", (b"\x03\x04", {"k": "v"}))
        for i in range(50):  # a burst: the client batches them into large POSTs
            client.emit("message", i)
        ready.wait(10)
        if "websocket" in transports:
            deadline = time.monotonic() + 5
            while client.transport() != "websocket" and time.monotonic() < deadline:
                time.sleep(0.05)
        got["transport"] = client.transport()
    finally:
        client.disconnect()
    got["connected_after"] = client.connected
    return got


@pytest.mark.parametrize(
    "transports", [["polling"], ["websocket"], ["polling", "websocket"]], ids="+".join
)
async def test_python_socketio_client(reference: Reference, transports: list[str]) -> None:
    host, port = reference.host, reference.port
    got = await trio.to_thread.run_sync(socketio_flow, f"http://{host}:{port}", transports)
    assert got["auth"] == [{"token": "123"}]
    assert got["custom_auth"] == [{"token": "123"}]
    assert got["ack"] == (1, "2", {"3": [True]})
    assert got["binary_ack"] == (b"\x01\x02", "x")
    assert got["back"][0] == [b"\x03\x04", {"k": "v"}]
    assert got["back"][1:] == [[i] for i in range(50)]
    assert got["transport"] == transports[-1]
    assert got["connected_after"] is False
    with trio.fail_after(10):  # a hang guard: the server saw the client leave both namespaces
        await reference.disconnects.wait_for(2)
