"""Graceful drain on SIGTERM, on the real model, over every transport.

The first signal turns readiness to 503 `draining` and refuses new generations with
503 `draining` on every transport; generations in flight finish (up to
DRAIN_TIMEOUT_SECONDS), what is left then ends with its final event (cause
`shutdown`), every turn is stored once, and the process exits 0 without waiting for
idle connections. A second signal exits at once.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
import trio

from fabricai_trio.sessions.sql import SqlSessionStore

from .server_process import ServerProcess, model_env
from .sse_client import parse_lines

pytestmark = pytest.mark.model

LONG = 800  # tokens (N_CTX is 1024): far more than a one-second drain lets it decode


def start(model_path: Path, logs: Path, **settings: str) -> ServerProcess:
    env = model_env(model_path, MAX_CONCURRENT_REQUESTS="4", MAX_TOKENS_LIMIT="2048",
                    **settings)
    return ServerProcess(env, log_dir=logs).start()


class Reader(threading.Thread):
    """Reads one streaming HTTP response in a thread; `first` is set at the first data."""

    def __init__(self, url: str, path: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.lines: list[str] = []
        self.first = threading.Event()
        self.status: int | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + self.path, json=self.body,
                              timeout=120) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    self.lines.append(line)
                    if line.startswith("data:") and ('"text":' in line or '"content":' in line):
                        self.first.set()  # a token (SSE) or a content chunk (OpenAI)
        except httpx.HTTPError:
            pass
        finally:
            self.first.set()

    def last_line(self) -> str:
        return [line for line in self.lines if line][-1]

    def events(self) -> list[Any]:
        return [e for e in parse_lines(iter([*self.lines, ""])) if e.comment is None]


class SioReader:
    """A python-socketio client that records inference events and its disconnect."""

    def __init__(self, url: str) -> None:
        self.client = socketio.Client(reconnection=False)
        self.events: list[tuple[str, Any]] = []
        self.first = threading.Event()
        self.disconnected = threading.Event()
        for name in ("inference_token", "inference_complete", "inference_error"):
            self.client.on(name, self._record(name))
        self.client.on("disconnect", lambda *_: self.disconnected.set())
        self.client.connect(url, transports=["websocket"], wait_timeout=10)

    def _record(self, name: str) -> Any:
        def record(data: Any) -> None:
            self.events.append((name, data))
            if name == "inference_token":
                self.first.set()
        return record


def refused_while_draining(url: str) -> None:
    ready = httpx.get(url + "/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert ready.headers["retry-after"]
    refused = httpx.post(url + "/v1/inference_sse", json={"prompt": "hi"}, timeout=10)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "draining"
    assert refused.headers["retry-after"]
    openai = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=10)
    assert openai.status_code == 503 and openai.json()["error"]["code"] == "draining"


def wait_in_log(server: ServerProcess, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)


@pytest.fixture
def sessions_db(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'sessions.db'}"


def stored(url: str, session_id: str) -> list[Any]:
    async def read() -> list[Any]:
        store = SqlSessionStore(url)
        try:
            session = await store.get(session_id)
            return list(session.messages) if session else []
        finally:
            await store.aclose()

    return trio.run(read)


def test_in_flight_generations_finish_and_new_ones_are_refused(
    model_path: Path, server_logs: Path, sessions_db: str
) -> None:
    server = start(model_path, server_logs, DRAIN_TIMEOUT_SECONDS="120",
                   SESSION_STORE="sql", DATABASE_URL=sessions_db, SESSION_AUTOCREATE="true")
    try:
        sse = Reader(server.url, "/v1/inference_sse",
                     {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
                      "session_id": "drain-sse"})
        openai = Reader(server.url, "/v1/completions",
                        {"prompt": "Once upon a time", "max_tokens": 40, "stream": True})
        sio = SioReader(server.url)
        sio.client.call("inference_prompt", {"prompt": "Once upon a time", "max_tokens": 40},
                        timeout=30)
        sse.start()
        openai.start()
        assert sse.first.wait(60) and openai.first.wait(60) and sio.first.wait(60)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        wait_in_log(server, "draining")
        refused_while_draining(server.url)
        refusal = sio.client.call("inference_prompt", {"prompt": "hi"}, timeout=30)
        assert refusal["error"]["code"] == "draining"
        sse.join(120)
        openai.join(120)
        assert server.proc.wait(120) == 0, server.log()
    finally:
        server.stop()
    final = sse.events()[-1]
    assert final.event == "complete" and final.data["finish_reason"] in ("length", "stop")
    assert openai.last_line() == "data: [DONE]"
    completes = [d for name, d in sio.events if name == "inference_complete"]
    assert len(completes) == 1 and completes[0]["finish_reason"] in ("length", "stop")
    assert sio.disconnected.wait(10)  # the CLOSE packet came after the final event
    turn = stored(sessions_db, "drain-sse")
    assert [m.role for m in turn] == ["user", "assistant"]
    assert turn[1].finish_reason == final.data["finish_reason"]
    assert "drained in" in server.log() and "Traceback" not in server.log()


def test_the_drain_deadline_ends_what_is_left_with_final_events(
    model_path: Path, server_logs: Path, sessions_db: str
) -> None:
    server = start(model_path, server_logs, DRAIN_TIMEOUT_SECONDS="1",
                   SESSION_STORE="sql", DATABASE_URL=sessions_db, SESSION_AUTOCREATE="true")
    try:
        sse = Reader(server.url, "/v1/inference_sse",
                     {"prompt": "Once upon a time", "max_tokens": LONG,
                      "session_id": "deadline-sse"})
        openai = Reader(server.url, "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "Tell a long story."}],
                         "max_tokens": LONG, "stream": True})
        sio = SioReader(server.url)
        sio.client.call("inference_prompt", {"prompt": "Once upon a time",
                                             "max_tokens": LONG}, timeout=30)
        sse.start()
        openai.start()
        assert sse.first.wait(60) and openai.first.wait(60) and sio.first.wait(60)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        sse.join(60)
        openai.join(60)
        assert server.proc.wait(60) == 0, server.log()
    finally:
        server.stop()
    final = sse.events()[-1]
    assert final.event == "complete"
    assert (final.data["finish_reason"], final.data["cancel_cause"]) == ("cancelled", "shutdown")
    assert final.data["usage"]["completion_tokens"] < LONG
    chunks = [json.loads(line[5:]) for line in openai.lines
              if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # OpenAI has no `cancelled`
    assert openai.last_line() == "data: [DONE]"
    completes = [d for name, d in sio.events if name == "inference_complete"]
    assert len(completes) == 1
    assert (completes[0]["finish_reason"], completes[0]["cancel_cause"]) == (
        "cancelled", "shutdown")
    assert sio.disconnected.wait(10)
    turn = stored(sessions_db, "deadline-sse")
    assert [m.role for m in turn] == ["user", "assistant"]  # stored once
    assert turn[1].finish_reason == "cancelled"
    assert turn[1].content == final.data["text"]


def test_idle_connections_do_not_hold_the_exit(model_path: Path, server_logs: Path) -> None:
    """An idle keep-alive HTTP client and an idle Socket.IO client: the exit does not
    wait SHUTDOWN_GRACE_SECONDS (60 here) for them."""
    server = start(model_path, server_logs, SHUTDOWN_GRACE_SECONDS="60")
    try:
        keepalive = httpx.Client(base_url=server.url, timeout=10)
        assert keepalive.get("/v1/status").status_code == 200  # the connection stays open
        sio = SioReader(server.url)
        assert server.proc is not None
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(50) == 0, server.log()
        assert time.monotonic() - started < 30  # far from the 60 s grace
        assert sio.disconnected.wait(10)
        keepalive.close()
    finally:
        server.stop()


def test_a_second_signal_exits_at_once(model_path: Path, server_logs: Path) -> None:
    server = start(model_path, server_logs, DRAIN_TIMEOUT_SECONDS="600")
    try:
        sse = Reader(server.url, "/v1/inference_sse",
                     {"prompt": "Once upon a time", "max_tokens": LONG})
        sse.start()
        assert sse.first.wait(60)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        wait_in_log(server, "draining")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 1, server.log()  # not the 600 s drain
        assert "exiting at once" in server.log()
    finally:
        server.stop()
