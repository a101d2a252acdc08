"""Per-connection bounds of the realtime server over real sockets (issue 17, item 3 and
the low findings): a real Hypercorn in process (tests/inprocess.py), real clients
(python-socketio, websocket-client, httpx); the engine is the fake one because these
are concurrency tests (handlers held open on purpose).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import pytest
import socketio
import trio
import websocket

from fabricai_trio.core.engine import Chunk, EngineRequest

from .fakes import FakeEngine
from .inprocess import served, wait_for


class GatedEngine(FakeEngine):
    """Tokenizes only once `gate` is set, so event handlers stay in flight."""

    gate: trio.Event
    waiting = 0

    async def tokenize(
        self, text: str, *, add_bos: bool = True, limit: int | None = None
    ) -> list[int]:
        if text != "hi":  # the warm-up
            return await super().tokenize(text, add_bos=add_bos, limit=limit)
        GatedEngine.waiting += 1
        try:
            await GatedEngine.gate.wait()
        finally:
            GatedEngine.waiting -= 1
        return await super().tokenize(text, add_bos=add_bos, limit=limit)


async def test_the_101st_event_in_flight_on_one_connection_is_refused() -> None:
    GatedEngine.gate = trio.Event()
    GatedEngine.waiting = 0
    async with served(GatedEngine, max_queue_size=1000) as (app, client):
        url = str(client.base_url)
        sio = socketio.Client(reconnection=False)
        errors: list[Any] = []
        acks: list[Any] = [None] * 101
        refused = threading.Event()
        sio.on("inference_error", errors.append)

        def ack(i: int) -> Any:
            def record(data: Any) -> None:
                acks[i] = data
                if i == 100:
                    refused.set()
            return record

        def burst() -> None:
            sio.connect(url, transports=["websocket"], wait_timeout=10)
            for i in range(101):
                sio.emit("inference_prompt", {"prompt": "hi", "max_tokens": 1,
                                              "request_id": f"r{i}"}, callback=ack(i))
            assert refused.wait(10)

        await trio.to_thread.run_sync(burst)
        assert GatedEngine.waiting == 100  # the first 100 are still in their handlers
        assert acks[100]["request_id"] == "r100"
        assert acks[100]["error"]["code"] == "too_many_events"
        assert [e["code"] for e in errors] == ["too_many_events"]
        assert all(a is None for a in acks[:100])
        GatedEngine.gate.set()
        await wait_for(lambda: all(a is not None for a in acks))
        assert all(a == {"request_id": f"r{i}"} for i, a in enumerate(acks[:100]))
        await trio.to_thread.run_sync(sio.disconnect)
        await wait_for(lambda: app.state.service.live_count == 0)


async def open_polling(client: httpx.AsyncClient) -> str:
    opened = await client.get("/socket.io/", params={"EIO": "4", "transport": "polling"})
    sid: str = json.loads(opened.text[1:])["sid"]
    return sid


async def test_a_polling_payload_of_too_many_packets_is_refused_before_decoding() -> None:
    async with served() as (_, client):
        sid = await open_polling(client)
        params = {"EIO": "4", "transport": "polling", "sid": sid}
        # about 1 MB of NOOPs (under maxPayload): refused on a count of the separators
        body = "\x1e".join(["6"] * 499_999)
        assert len(body) < 1_000_000
        async with trio.open_nursery() as nursery:
            statuses: list[int] = []

            async def meanwhile() -> None:
                statuses.append((await client.get("/livez")).status_code)

            nursery.start_soon(meanwhile)
            refused = await client.post("/socket.io/", params=params, content=body)
        assert refused.status_code == 400
        assert statuses == [200]
        gone = await client.get("/socket.io/", params=params)
        assert gone.status_code == 400  # the session was closed
        # a burst under the cap is delivered whole (in batches)
        sid = await open_polling(client)
        params["sid"] = sid
        ok = await client.post("/socket.io/", params=params,
                               content="\x1e".join(["40", *(["6"] * 998)]))
        assert ok.status_code == 200


async def test_a_websocket_message_over_max_payload_is_not_buffered() -> None:
    async with served(socketio_max_payload=65_536) as (_, client):
        url = str(client.base_url).replace("http://", "ws://")

        def send_large() -> tuple[int, bytes]:
            ws = websocket.create_connection(
                f"{url}/socket.io/?EIO=4&transport=websocket", timeout=10)
            try:
                ws.recv()  # OPEN
                ws.send("4" + "x" * 200_000)
                while True:
                    opcode, frame = ws.recv_data(control_frame=True)
                    if opcode == websocket.ABNF.OPCODE_CLOSE:
                        return opcode, frame.data if hasattr(frame, "data") else frame
            finally:
                ws.close()

        _, data = await trio.to_thread.run_sync(send_large)
        # Hypercorn closes it with 1009 (message too big) before buffering it all
        assert int.from_bytes(data[:2], "big") == 1009


class Forever(FakeEngine):
    """Streams until cancelled (but for the one-token warm-up)."""

    async def generate_stream(self, request: EngineRequest) -> AsyncGenerator[Chunk, None]:
        for _ in range(10**9 if request.max_tokens > 1 else 1):
            await trio.sleep(self.step_seconds)
            yield Chunk(" x", 1)


async def test_a_namespace_disconnect_mid_generation_logs_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with served(Forever) as (app, client):
        url = str(client.base_url).replace("http://", "ws://")

        def run() -> None:
            ws = websocket.create_connection(
                f"{url}/socket.io/?EIO=4&transport=websocket", timeout=10)
            try:
                ws.recv()  # OPEN
                ws.send("40")
                ws.recv()  # CONNECT
                ws.send("420" + json.dumps(["inference_prompt",
                                            {"prompt": "hi", "max_tokens": 100}]))
                while "inference_token" not in str(ws.recv()):
                    pass
                ws.send("41")  # leave the namespace; the session stays
                ws.send("40")  # and come back
                while not str(ws.recv()).startswith("40"):
                    pass
            finally:
                ws.close()

        await trio.to_thread.run_sync(run)
        await wait_for(lambda: app.state.service.live_count == 0)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records
                                                          if r.exc_info]


def slow_cancels(app: Any) -> float:
    value: float = app.state.metrics.cancellations.labels("slow_client")._value.get()
    return value


SLOW: dict[str, Any] = {"slow_client_timeout_seconds": 1.0, "stream_buffer_bytes": 1024,
        "session_autocreate": True, "max_tokens_limit": 4000}


def stuck_post(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a request on a socket with a tiny receive buffer that is never read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("path", ["/v1/inference_sse", "/v1/chat/completions"])
async def test_an_http_stream_that_is_not_read_is_cancelled_as_slow_client(path: str) -> None:
    async with served(step_seconds=0.001, **SLOW) as (app, client):
        port = int(str(client.base_url).rsplit(":", 1)[1])
        body: dict[str, Any] = {"prompt": "hi", "max_tokens": 4000, "session_id": "s1"}
        if path == "/v1/chat/completions":  # with the OpenAI shape
            body = {"messages": [{"role": "user", "content": body.pop("prompt")}],
                    "stream": True, **body}
        sock = await trio.to_thread.run_sync(stuck_post, port, path, body)
        try:
            await wait_for(lambda: slow_cancels(app) == 1, timeout=60)
            await wait_for(lambda: app.state.service.live_count == 0)
            status = (await client.get("/v1/status")).json()["concurrency"]
            assert (status["active"], status["queued"]) == (0, 0)
            session = await app.state.store.get("s1")
            assert session is not None
            turn = session.messages[-1]
            assert turn.finish_reason == "cancelled"
            assert 0 < (turn.completion_tokens or 0) < 4000
        finally:
            sock.close()


async def test_a_polling_client_that_stops_fetching_is_cancelled_as_slow_client() -> None:
    async with served(step_seconds=0.001, **SLOW) as (app, client):
        sid = await open_polling(client)
        params = {"EIO": "4", "transport": "polling", "sid": sid}
        assert (await client.post("/socket.io/", params=params, content="40")).status_code == 200
        assert (await client.get("/socket.io/", params=params)).text.startswith("40")
        prompt = json.dumps(["inference_prompt", {"prompt": "hi", "max_tokens": 4000,
                                                  "session_id": "s2"}])
        assert (await client.post("/socket.io/", params=params,
                                  content="42" + prompt)).status_code == 200
        # and never GETs again
        await wait_for(lambda: slow_cancels(app) == 1, timeout=60)
        await wait_for(lambda: app.state.service.live_count == 0)
        session = await app.state.store.get("s2")
        assert session is not None and session.messages[-1].finish_reason == "cancelled"
        assert (await client.get("/socket.io/", params=params)).status_code == 400  # closed


async def test_a_websocket_client_that_stops_reading_is_cancelled_as_slow_client() -> None:
    from .test_slow_clients import websocket_prompt_and_never_read

    async with served(step_seconds=0.001, **SLOW) as (app, client):
        port = int(str(client.base_url).rsplit(":", 1)[1])
        sock = await trio.to_thread.run_sync(
            websocket_prompt_and_never_read, port,
            {"prompt": "hi", "max_tokens": 4000, "session_id": "s3"})
        try:
            await wait_for(lambda: slow_cancels(app) == 1, timeout=60)
            await wait_for(lambda: app.state.service.live_count == 0)
            session = await app.state.store.get("s3")
            assert session is not None and session.messages[-1].finish_reason == "cancelled"
        finally:
            sock.close()


async def test_connections_beyond_max_connections_are_closed_at_once() -> None:
    async with served(max_connections=3) as (_, client):
        port = int(str(client.base_url).rsplit(":", 1)[1])

        def request_on_new_connection() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                try:
                    sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    return sock.recv(4096)
                except ConnectionResetError:  # closed with the request unread
                    return b""

        assert (await client.get("/livez")).status_code == 200  # the client's connection
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        try:
            assert await trio.to_thread.run_sync(request_on_new_connection) == b""
        finally:
            for sock in idle:
                sock.close()
        served_again = b""
        for _ in range(100):  # once the idle ones are gone, a new connection is served
            served_again = await trio.to_thread.run_sync(request_on_new_connection)
            if served_again:
                break
            await trio.sleep(0.05)
        assert served_again.startswith(b"HTTP/1.1 200")


async def test_keep_alive_timeout_counts_from_the_last_response() -> None:
    """`server.IdleTimer`: one timer per connection, moved by each request. A connection
    used more often than KEEP_ALIVE_SECONDS stays open past it, a stream longer than it
    is not cut, and a connection idle for longer is closed by the server."""
    async with served(keep_alive_seconds=0.4) as (_, client):
        port = int(str(client.base_url).rsplit(":", 1)[1])

        def converse() -> tuple[list[bytes], bytes]:
            answers = []
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                for _ in range(6):  # 6 times 0.15 s: past 0.4 s, never idle that long
                    sock.sendall(b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    answers.append(sock.recv(4096))
                    threading.Event().wait(0.15)
                body = json.dumps({"prompt": "p", "max_tokens": 40}).encode()  # 0.8 s
                sock.sendall(b"POST /v1/inference_sse HTTP/1.1\r\nHost: localhost\r\n"
                             b"Content-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                stream = b""
                while not stream.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
                    chunk = sock.recv(65536)
                    assert chunk, "the stream was cut"
                    stream += chunk
                assert b"event: complete" in stream
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n")
                answers.append(sock.recv(4096))
                threading.Event().wait(1.0)  # idle past the timeout: the server closes
                closed = sock.recv(4096)
            return answers, closed

        answers, closed = await trio.to_thread.run_sync(converse)
        assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers), answers
        assert closed == b""


async def test_sessions_and_sessions_that_never_connect_are_capped() -> None:
    async with served(socketio_max_unconnected=2, socketio_max_sessions=3) as (_, client):
        params = {"EIO": "4", "transport": "polling"}
        first, second = await open_polling(client), await open_polling(client)
        third = await open_polling(client)  # over the unconnected cap: closed at once
        closed = await client.get("/socket.io/", params={**params, "sid": third})
        assert closed.text == "1"
        for sid in (first, second):  # these may connect
            await client.post("/socket.io/", params={**params, "sid": sid}, content="40")
            assert (await client.get("/socket.io/",
                                     params={**params, "sid": sid})).text.startswith("40")
        await open_polling(client)  # the third session
        refused = await client.get("/socket.io/", params=params)
        assert refused.status_code == 503
