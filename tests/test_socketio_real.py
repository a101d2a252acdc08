"""Socket.IO inference with python-socketio's own Client against the real server and model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio

from .live import ended_normally
from .server_process import ServerProcess

pytestmark = pytest.mark.model

TRANSPORTS = {
    "polling": ["polling"],
    "websocket": ["websocket"],
    "upgrade": ["polling", "websocket"],
}


@pytest.fixture(scope="module")
def sio_server(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    env = {
        "LLM_MODEL": str(model_path), "CHAT_FORMAT": "gemma",
        "MAX_CONCURRENT_REQUESTS": "2", "MAX_QUEUE_SIZE": "2", "N_CTX": "1024",
        "SESSION_AUTOCREATE": "true",
    }
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


class Recorder:
    """A connected client that records every inference event it receives."""

    def __init__(self, url: str, transports: list[str]) -> None:
        self.client = socketio.Client(reconnection=False)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.done = threading.Event()
        self.first_token = threading.Event()
        for name in ("inference_queued", "inference_token", "inference_complete",
                     "inference_error"):
            self.client.on(name, self._recorder(name))
        self.client.connect(url, transports=transports, wait_timeout=10)

    def _recorder(self, name: str) -> Any:
        def record(data: dict[str, Any]) -> None:
            self.events.append((name, data))
            if name == "inference_token":
                self.first_token.set()
            if name in ("inference_complete", "inference_error"):
                self.done.set()
        return record

    def prompt(self, **payload: Any) -> dict[str, Any]:
        ack: dict[str, Any] = self.client.call("inference_prompt", payload, timeout=30)
        return ack

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def close(self) -> None:
        self.client.disconnect()


def status(url: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{url}/v1/status", timeout=10).json()
    return data


def wait_idle(url: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll /v1/status until nothing runs or waits (`timeout`: a hang guard, not a budget)."""
    deadline = time.monotonic() + timeout
    while True:
        data = status(url)
        if data["concurrency"]["active"] == 0 and data["concurrency"]["queued"] == 0:
            return data
        assert time.monotonic() < deadline, data
        time.sleep(0.02)


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_prompt_streams_tokens_and_completes(sio_server: ServerProcess, transport: str) -> None:
    client = Recorder(sio_server.url, TRANSPORTS[transport])
    try:
        ack = client.prompt(prompt="Once upon a time", max_tokens=12, temperature=0,
                            request_id=f"t-{transport}")
        assert ack == {"request_id": f"t-{transport}"}
        assert client.done.wait(30)
        names = client.names()
        assert names[0] == "inference_queued" and names[-1] == "inference_complete"
        tokens = [d for n, d in client.events if n == "inference_token"]
        complete = client.events[-1][1]
        assert [t["index"] for t in tokens] == list(range(len(tokens)))
        assert "".join(t["text"] for t in tokens) == complete["text"]
        assert ended_normally(complete["finish_reason"], complete["usage"]["completion_tokens"],
                              12)
        assert all(d["request_id"] == f"t-{transport}" for _, d in client.events)
    finally:
        client.close()
    wait_idle(sio_server.url)


def test_same_output_as_sse(sio_server: ServerProcess) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 10, "temperature": 0}
    sse = httpx.post(f"{sio_server.url}/v1/inference_sse", json=body, timeout=30).text
    client = Recorder(sio_server.url, ["websocket"])
    try:
        client.prompt(**body)
        assert client.done.wait(30)
        assert f'"text":{_json(client.events[-1][1]["text"])}' in sse
    finally:
        client.close()


def _json(value: str) -> str:
    import json

    return json.dumps(value, separators=(",", ":"))


@pytest.mark.parametrize("transport", ["polling", "websocket"])
def test_cancel_ends_with_cancelled_and_frees_the_slot(
    sio_server: ServerProcess, transport: str
) -> None:
    client = Recorder(sio_server.url, TRANSPORTS[transport])
    try:
        ack = client.prompt(prompt="Once upon a time", max_tokens=400)
        assert client.first_token.wait(30)
        result = client.client.call("inference_cancel", {"request_id": ack["request_id"]},
                                    timeout=10)
        assert result == {"request_id": ack["request_id"], "cancelled": True}
        assert client.done.wait(10)
        name, complete = client.events[-1]
        assert name == "inference_complete"
        assert complete["finish_reason"] == "cancelled"
        assert complete["usage"]["completion_tokens"] < 400  # stopped, however loaded the CPU
        idle = wait_idle(sio_server.url)
        time.sleep(0.3)  # nothing more is decoded for it afterwards
        assert status(sio_server.url)["engine"]["tokens_generated"] == idle["engine"][
            "tokens_generated"
        ]
        unknown = client.client.call("inference_cancel", {"request_id": "nope"}, timeout=10)
        assert unknown["cancelled"] is False and unknown["error"]["code"] == "request_not_found"
    finally:
        client.close()


@pytest.mark.parametrize("transport", ["polling", "websocket"])
def test_disconnect_mid_generation_frees_the_slot(
    sio_server: ServerProcess, transport: str
) -> None:
    client = Recorder(sio_server.url, TRANSPORTS[transport])
    client.prompt(prompt="Once upon a time", max_tokens=400)
    assert client.first_token.wait(30)
    client.close()
    idle = wait_idle(sio_server.url)
    time.sleep(0.3)  # nothing more is decoded for it afterwards
    assert status(sio_server.url)["engine"]["tokens_generated"] == idle["engine"][
        "tokens_generated"
    ]
    again = Recorder(sio_server.url, TRANSPORTS[transport])
    try:
        again.prompt(prompt="Next", max_tokens=3)
        assert again.done.wait(30)
        assert again.events[-1][0] == "inference_complete"
    finally:
        again.close()


def test_queue_full_is_an_error_event_with_429(sio_server: ServerProcess) -> None:
    wait_idle(sio_server.url)
    client = Recorder(sio_server.url, ["websocket"])
    try:
        acks = [client.prompt(prompt="Once upon a time", max_tokens=60, temperature=0)
                for _ in range(5)]
        refused = [a for a in acks if "error" in a]
        assert len(refused) == 1
        assert refused[0]["error"]["code"] == "queue_full"
        errors = [d for n, d in client.events if n == "inference_error"]
        assert errors and errors[0]["status"] == 429 and errors[0]["code"] == "queue_full"
        deadline = time.monotonic() + 240  # a hang guard: 4 x 60 tokens on a loaded CPU
        while sum(n == "inference_complete" for n in client.names()) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        client.close()
    wait_idle(sio_server.url)


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ("not an object", 400, "invalid_body"),
        ({"max_tokens": 3}, 422, "invalid_field"),
        ({"prompt": "hi", "max_tokens": -2}, 422, "invalid_field"),
        ({"prompt": "hi", "bogus": True}, 422, "invalid_field"),
    ],
)
def test_bad_input_is_an_error_event(
    sio_server: ServerProcess, payload: Any, status: int, code: str
) -> None:
    client = Recorder(sio_server.url, ["websocket"])
    try:
        ack = client.client.call("inference_prompt", payload, timeout=10)
        assert ack["error"]["message"]
        assert client.done.wait(10)
        name, data = client.events[-1]
        assert name == "inference_error"
        assert (data["status"], data["code"]) == (status, code)
        assert ack["error"]["code"] == code
        ok = client.prompt(prompt="Hi", max_tokens=2)
        assert "error" not in ok
    finally:
        client.close()


def test_session_room_watchers_see_the_generation(sio_server: ServerProcess) -> None:
    owner = Recorder(sio_server.url, ["websocket"])
    watcher = Recorder(sio_server.url, ["polling"])
    try:
        first = owner.prompt(prompt="Hello there", session_id="room-test", max_tokens=3)
        assert "error" not in first
        assert owner.done.wait(30)
        joined = watcher.client.call("join_session", {"session_id": "room-test"}, timeout=10)
        assert joined == {"session_id": "room-test", "joined": True}
        owner.done.clear()
        owner.prompt(prompt="And again", session_id="room-test", max_tokens=4,
                     request_id="turn-2")
        assert owner.done.wait(30) and watcher.done.wait(30)
        seen = [d["request_id"] for _, d in watcher.events]
        assert seen and set(seen) == {"turn-2"}
        assert watcher.events[-1][1]["text"] == owner.events[-1][1]["text"]
        missing = watcher.client.call("join_session", {"session_id": "no-such"}, timeout=10)
        assert missing["error"]["code"] in ("session_not_found",)
    finally:
        owner.close()
        watcher.close()


JS_DIR = Path(__file__).resolve().parent / "js"


@pytest.mark.parametrize("transports", ["polling", "websocket", "polling,websocket"])
def test_npm_socket_io_client_inference(sio_server: ServerProcess, transports: str) -> None:
    import json
    import shutil
    import subprocess

    node = shutil.which("node")
    assert node, "node is needed (scripts/test installs it)"
    if not (JS_DIR / "node_modules" / "socket.io-client").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True,
                       capture_output=True, timeout=300)
    done = subprocess.run([node, str(JS_DIR / "inference.mjs"), sio_server.url, transports],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    got = json.loads(done.stdout)
    assert got["ack"] == {"request_id": "js-1"}
    assert ended_normally(got["complete"]["finish_reason"],
                          got["complete"]["usage"]["completion_tokens"], 10)
    assert "".join(got["tokens"]) == got["complete"]["text"]
    assert got["cancelAck"] == {"request_id": "js-2", "cancelled": True}
    assert got["cancelled"]["finish_reason"] == "cancelled"
    assert got["transport"] == transports.split(",")[-1]
    wait_idle(sio_server.url)


def test_connect_needs_credentials_when_auth_is_on(model_path: Path, server_logs: Path) -> None:
    env = {"LLM_MODEL": str(model_path), "API_KEYS": "k-one,k-two"}
    with ServerProcess(env, log_dir=server_logs) as proc:
        for auth, code in ((None, "missing_credentials"), ({"apiKey": "wrong"}, None),
                           ({"token": "nope"}, None)):
            client = socketio.Client(reconnection=False)
            refused: list[Any] = []
            client.on("connect_error", refused.append)
            with pytest.raises(socketio.exceptions.ConnectionError):
                client.connect(proc.url, auth=auth, transports=["websocket"], wait_timeout=10)
            assert refused, "CONNECT_ERROR carries {message, data}"
            assert refused[0]["message"]
            assert refused[0]["data"]["type"] == "authentication_error"
            if code is not None:
                assert refused[0]["data"]["code"] == code
        good = socketio.Client(reconnection=False)
        done = threading.Event()
        good.on("inference_complete", lambda data: done.set())
        good.connect(proc.url, auth={"apiKey": "k-one"}, transports=["websocket"],
                     wait_timeout=10)
        try:
            ack = good.call("inference_prompt", {"prompt": "Hi", "max_tokens": 2}, timeout=30)
            assert "error" not in ack
            assert done.wait(30)
        finally:
            good.disconnect()
        bearer = socketio.Client(reconnection=False)
        bearer.connect(proc.url, auth={"token": "k-two"}, transports=["polling"], wait_timeout=10)
        bearer.disconnect()


def test_session_room_spans_server_processes(model_path: Path, server_logs: Path) -> None:
    """Two servers on one Redis: a watcher on one sees a generation run on the other."""
    from .redis_server import RedisServer

    with RedisServer() as redis:
        env = {"LLM_MODEL": str(model_path), "REDIS_URL": redis.url, "N_CTX": "1024",
               "SESSION_AUTOCREATE": "true"}
        with ServerProcess(env, log_dir=server_logs) as one, \
                ServerProcess(env, log_dir=server_logs) as two:
            writer = Recorder(two.url, ["websocket"])
            watcher = Recorder(one.url, ["websocket"])
            try:
                assert "error" not in writer.prompt(prompt="Hi", session_id="x-proc",
                                                    max_tokens=2)
                assert writer.done.wait(30)
                joined = watcher.client.call("join_session", {"session_id": "x-proc"},
                                             timeout=10)
                assert joined == {"session_id": "x-proc", "joined": True}
                writer.done.clear()
                writer.prompt(prompt="Again", session_id="x-proc", max_tokens=6,
                              request_id="cross-2")
                assert writer.done.wait(30)
                # The fan-out is asynchronous: an event of the first turn published
                # before the join may still arrive after it. The second turn's events
                # must all arrive, in order.
                deadline = time.monotonic() + 30
                while not any(n == "inference_complete" and d["request_id"] == "cross-2"
                              for n, d in watcher.events):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                second = [(n, d) for n, d in watcher.events if d["request_id"] == "cross-2"]
                assert second[-1][1]["text"] == writer.events[-1][1]["text"]
                tokens = [d for n, d in second if n == "inference_token"]
                assert "".join(t["text"] for t in tokens) == second[-1][1]["text"]
            finally:
                writer.close()
                watcher.close()
