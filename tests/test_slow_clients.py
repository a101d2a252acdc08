"""Clients that stop reading, on the real model over real sockets (issue 17, item 2).

Raw sockets with a tiny receive buffer send a request and never read a byte. Their
generations must not hold the slots: after SLOW_CLIENT_TIMEOUT_SECONDS of nothing
written they end (`cancelled`, cause `slow_client`, the turn stored), a normal request
that waited gets a slot, `/v1/status` shows nothing active, and SIGTERM exits within
the drain and grace settings even with such clients connected.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .server_process import ServerProcess, model_env

pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

LONG = 900  # tokens: far more than fits in the socket buffers before the writes block
#: The embedded model's end-of-generation tokens, banned: a generation that ended by
#: itself before the buffers filled (sampling varies with the CPU) would never be stuck.
NO_END = {"1": -100.0, "106": -100.0, "212": -100.0}
SLOW_TIMEOUT = 2.0


#: A hang guard, not a budget: how long the socket buffers take to fill depends on the
#: decode speed (about 130 tokens fill the kernel's buffers on loopback).
GUARD = 600


def long_id(name: str) -> str:
    """A request id of the longest length allowed: every event carries it, so the
    socket buffers fill in fewer tokens."""
    return (name + "-" * 128)[:128]


def start(model_path: Path, logs: Path, **settings: str) -> ServerProcess:
    env = model_env(model_path, **{
        "MAX_CONCURRENT_REQUESTS": "2", "MAX_QUEUE_SIZE": "4", "MAX_TOKENS_LIMIT": "2048",
        "SLOW_CLIENT_TIMEOUT_SECONDS": str(SLOW_TIMEOUT), "STREAM_BUFFER_BYTES": "2048",
        "SESSION_AUTOCREATE": "true",
        # no PING for the test's length: a client that never reads never answers one,
        # and a ping timeout would end its session before the writes block
        "SOCKETIO_PING_INTERVAL_MS": "600000", **settings,
    })
    return ServerProcess(env, log_dir=logs).start()


@pytest.fixture(scope="module")
def server(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    server = start(model_path, server_logs)
    try:
        yield server
    finally:
        server.stop()


def stuck_socket(port: int) -> socket.socket:
    """A TCP connection whose receive buffer is as small as the kernel allows."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    return sock


def post_and_never_read(port: int, path: str, body: dict[str, Any], request_id: str = ""
                        ) -> socket.socket:
    sock = stuck_socket(port)
    data = json.dumps(body).encode()
    extra = f"X-Request-Id: {request_id}\r\n" if request_id else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(data)}\r\n\r\n").encode()
    sock.sendall(head + data)
    return sock


def websocket_prompt_and_never_read(port: int, payload: dict[str, Any]) -> socket.socket:
    """A Socket.IO client over a raw websocket: handshake, CONNECT, one
    `inference_prompt`, then it reads nothing more."""
    sock = stuck_socket(port)
    sock.sendall(b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
                 b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    read_until(sock, b'"maxPayload"')  # the 101 and the OPEN packet
    send_ws_text(sock, "40")
    read_until(sock, b"40{")
    send_ws_text(sock, "42" + json.dumps(["inference_prompt", payload]))
    return sock


def read_until(sock: socket.socket, marker: bytes) -> None:
    seen = b""
    sock.settimeout(30)
    while marker not in seen:
        chunk = sock.recv(4096)
        assert chunk, seen
        seen += chunk


def send_ws_text(sock: socket.socket, text: str) -> None:
    """One masked text frame (mask 0: the payload is sent as is)."""
    data = text.encode()
    assert len(data) < 65536
    head = bytes([0x81, 0x80 | 126]) + len(data).to_bytes(2, "big") if len(data) > 125 \
        else bytes([0x81, 0x80 | len(data)])
    sock.sendall(head + b"\0\0\0\0" + data)


def status(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(url + "/v1/status", timeout=10).json()
    return body


def wait_idle(url: str, timeout: float = GUARD) -> None:
    deadline = time.monotonic() + timeout
    while True:
        concurrency = status(url)["concurrency"]
        if concurrency["active"] == 0 and concurrency["queued"] == 0:
            return
        assert time.monotonic() < deadline, concurrency
        time.sleep(0.1)


def slow_client_cancels(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.search(r'^fabricai_cancellations_total\{cause="slow_client"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def assistant_turn(url: str, session_id: str) -> dict[str, Any]:
    messages = httpx.get(f"{url}/v1/sessions/{session_id}/messages", timeout=10).json()
    items = messages["data"]
    turn: dict[str, Any] = items[-1]
    assert turn["role"] == "assistant"
    return turn


def test_sse_and_openai_clients_that_stop_reading_free_their_slots(
    server: ServerProcess,
) -> None:
    before = slow_client_cancels(server.url)
    stuck = [
        post_and_never_read(server.port, "/v1/inference_sse",
                            {"prompt": "Once upon a time", "max_tokens": LONG,
                             "logit_bias": NO_END,
                             "session_id": "slow-sse", "request_id": long_id("sse")}),
        post_and_never_read(server.port, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "Tell a long story."}],
                             "max_tokens": LONG, "logit_bias": NO_END, "stream": True,
                             "session_id": "slow-openai"},
                            request_id=long_id("openai")),
    ]
    try:
        deadline = time.monotonic() + 60
        while status(server.url)["concurrency"]["active"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # A normal request waits for a slot, and gets one once the stuck clients lose theirs.
        normal = httpx.post(server.url + "/v1/inference_sse",
                            json={"prompt": "Hello", "max_tokens": 4}, timeout=GUARD)
        assert normal.status_code == 200 and "event: complete" in normal.text
        wait_idle(server.url)
        assert slow_client_cancels(server.url) - before == 2
        for session_id in ("slow-sse", "slow-openai"):
            turn = assistant_turn(server.url, session_id)
            assert turn["finish_reason"] == "cancelled"
            assert 0 < turn["completion_tokens"] < LONG
    finally:
        for sock in stuck:
            sock.close()
    assert "Traceback" not in server.log()


def test_a_websocket_client_that_stops_reading_frees_its_slot(server: ServerProcess) -> None:
    before = slow_client_cancels(server.url)
    sock = websocket_prompt_and_never_read(
        server.port, {"prompt": "Once upon a time", "max_tokens": LONG, "logit_bias": NO_END,
                      "session_id": "slow-ws", "request_id": long_id("ws")})
    try:
        deadline = time.monotonic() + GUARD
        while status(server.url)["concurrency"]["active"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        while slow_client_cancels(server.url) - before < 1:
            assert time.monotonic() < deadline, server.log()
            if status(server.url)["concurrency"]["active"] == 0:  # ended, or just cancelled
                assert slow_client_cancels(server.url) - before == 1, "ended by itself"
            time.sleep(0.1)
        wait_idle(server.url)
        turn = assistant_turn(server.url, "slow-ws")
        assert turn["finish_reason"] == "cancelled" and turn["completion_tokens"] < LONG
    finally:
        sock.close()
    assert "Traceback" not in server.log()


def test_sigterm_exits_within_drain_and_grace_despite_clients_that_stop_reading(
    model_path: Path, server_logs: Path
) -> None:
    drain, grace = 1.0, 1.0
    # A long slow-client timeout: only the drain and grace settings may bound the exit.
    server = start(model_path, server_logs, DRAIN_TIMEOUT_SECONDS=str(drain),
                   SHUTDOWN_GRACE_SECONDS=str(grace), SLOW_CLIENT_TIMEOUT_SECONDS="600")
    stuck: list[socket.socket] = []
    try:
        stuck.append(post_and_never_read(server.port, "/v1/inference_sse",
                                         {"prompt": "Once upon a time", "max_tokens": LONG,
                                          "logit_bias": NO_END}))
        stuck.append(websocket_prompt_and_never_read(
            server.port, {"prompt": "Once upon a time", "max_tokens": LONG,
                          "logit_bias": NO_END}))
        # let the generations fill the socket buffers: the writes block, decoding stops
        deadline = time.monotonic() + GUARD
        while status(server.url)["concurrency"]["active"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        tokens, still = -1, 0
        while still < 3:
            assert time.monotonic() < deadline, server.log()
            now = status(server.url)["engine"]["tokens_generated"]
            tokens, still = now, (still + 1 if now == tokens else 0)
            time.sleep(1)
        assert server.proc is not None
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(60)
        took = time.monotonic() - signalled
    finally:
        for sock in stuck:
            sock.close()
        server.stop()
    assert code == 0, server.log()
    # drain + Socket.IO's CLOSE wait (2 s) + grace, and process exit; never the 600 s
    assert took < drain + 2 + grace + 10, (took, server.log())
