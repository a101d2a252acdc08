"""Cancel and resume from any replica: two real servers on one real Redis, the real model.

A stream started on replica A is cancelled with `POST /v1/inference_sse/{id}/cancel`
sent to replica B; the generation service on B finds nothing locally, reads which
replica runs it from Redis and forwards the cancel there over pub/sub. Another
owner's cancel is a 404 on both replicas, and the stream goes on.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio

from .redis_server import RedisServer
from .server_process import ServerProcess, model_env
from .sse_client import parse_lines

pytestmark = pytest.mark.model

OWNER_KEY = "replica-test-owner"
OTHER_KEY = "replica-test-other"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def tokens_generated(server: ServerProcess) -> int:
    status = httpx.get(f"{server.url}/v1/status", headers=bearer(OWNER_KEY), timeout=10)
    return int(status.json()["engine"]["tokens_generated"])



@pytest.fixture(scope="module")
def replicas(
    model_path: Path, server_logs: Path, redis: RedisServer
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    env = model_env(
        model_path,
        REDIS_URL=redis.url,
        REDIS_PREFIX="replicas:",
        API_KEYS=f"{OWNER_KEY},{OTHER_KEY}",
        OWNER_ID_SECRET="replicas-share-this-owner-id-secret!",
        MAX_TOKENS_LIMIT="512",
    )
    with ServerProcess(env, log_dir=server_logs) as a, \
            ServerProcess(env, log_dir=server_logs) as b:
        yield a, b


class Stream:
    """An SSE stream read in a thread; `tokens` grows as token events arrive."""

    def __init__(self, url: str, body: dict[str, Any], key: str) -> None:
        self.tokens: list[int] = []
        self.final: Any = None
        self.first_tokens = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, body, key), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict[str, Any], key: str) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/inference_sse", json=body,
                              headers=bearer(key), timeout=120) as response:
                assert response.status_code == 200, response.read()
                for event in parse_lines(response.iter_lines()):
                    if event.event == "token":
                        self.tokens.append(event.data["index"])
                        if len(self.tokens) >= 3:
                            self.first_tokens.set()
                    elif event.event in ("complete", "error"):
                        self.final = (event.event, event.data)
        finally:
            self.first_tokens.set()
            self.done.set()

    def join(self, timeout: float = 120) -> Any:
        assert self.done.wait(timeout), "the stream did not end"
        return self.final


def long_body(request_id: str) -> dict[str, Any]:
    return {"prompt": "Write a very long story about a dragon who learns to sail.",
            "max_tokens": 500, "temperature": 0, "request_id": request_id}


def cancel(url: str, request_id: str, key: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/inference_sse/{request_id}/cancel", headers=bearer(key),
                      timeout=30)


def test_a_stream_on_a_is_cancelled_from_b(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = replicas
    request_id = f"replica-{uuid.uuid4().hex}"
    stream = Stream(a.url, long_body(request_id), OWNER_KEY)
    assert stream.first_tokens.wait(60)
    response = cancel(b.url, request_id, OWNER_KEY)
    seen_at_cancel = len(stream.tokens)
    assert response.status_code == 200, response.text
    assert response.json() == {"request_id": request_id, "cancelled": True}
    kind, final = stream.join()
    assert kind == "complete"
    assert final["finish_reason"] == "cancelled"
    # Within one token: the step in flight when the cancel arrived, plus the one the
    # engine decodes ahead, plus one for a cancel still crossing Redis on a busy machine.
    assert len(stream.tokens) - seen_at_cancel <= 3
    assert final["usage"]["completion_tokens"] < 500
    # Gone everywhere: a second cancel is a miss on both replicas.
    assert cancel(b.url, request_id, OWNER_KEY).status_code == 404
    assert cancel(a.url, request_id, OWNER_KEY).status_code == 404
    for server in (a, b):
        status = httpx.get(f"{server.url}/v1/status", headers=bearer(OWNER_KEY)).json()
        assert status["concurrency"]["active"] == 0


def test_another_owner_cannot_cancel_on_either_replica(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = replicas
    request_id = f"replica-{uuid.uuid4().hex}"
    body = long_body(request_id) | {"max_tokens": 40}
    stream = Stream(a.url, body, OWNER_KEY)
    assert stream.first_tokens.wait(60)
    for server in (b, a):
        response = cancel(server.url, request_id, OTHER_KEY)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "request_not_found"
        assert response.json()["error"]["param"] == "request_id"
    kind, final = stream.join()
    assert kind == "complete"
    assert final["finish_reason"] in ("length", "stop")  # it ran its course


def test_unknown_request_id_is_404_on_both(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    for server in replicas:
        response = cancel(server.url, "no-such-generation", OWNER_KEY)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "request_not_found"


def test_a_resumable_stream_cut_on_a_resumes_on_b(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    """The TCP connection to A is cut mid-stream; the client reconnects to B with
    `Last-Event-ID` and gets the rest of the same generation (replayed from the Redis
    Stream, then live). One generation ran, on A; B started none."""
    a, b = replicas
    request_id = f"resume-{uuid.uuid4().hex}"
    body = {"prompt": "Write a story about a lighthouse keeper.", "max_tokens": 60,
            "temperature": 0, "request_id": request_id, "resumable": True}
    first: list[Any] = []
    with httpx.stream("POST", f"{a.url}/v1/inference_sse", json=body,
                      headers=bearer(OWNER_KEY), timeout=120) as response:
        assert response.status_code == 200
        for event in parse_lines(response.iter_lines()):
            if event.event is not None:
                first.append(event)
            if sum(e.event == "token" for e in first) == 5:
                break  # closing the response closes the connection
    generated_on_b = tokens_generated(b)
    with httpx.stream("GET", f"{b.url}/v1/inference_sse",
                      headers={**bearer(OWNER_KEY), "Last-Event-ID": first[-1].id},
                      timeout=120) as response:
        assert response.status_code == 200
        rest = [e for e in parse_lines(response.iter_lines()) if e.event is not None]
    joined = first + rest
    positions = [int(e.id.rsplit(":", 1)[1]) for e in joined]
    assert positions == list(range(len(joined)))
    complete = joined[-1]
    assert complete.event == "complete"
    assert complete.data["finish_reason"] in ("length", "stop")
    assert "".join(e.data["text"] for e in joined if e.event == "token") == complete.data["text"]
    assert tokens_generated(b) == generated_on_b  # B read the log; it decoded nothing
    # Nothing is missing now: 204 on either replica; another owner: 404.
    for server in (a, b):
        done = httpx.get(f"{server.url}/v1/inference_sse",
                         headers={**bearer(OWNER_KEY), "Last-Event-ID": complete.id},
                         timeout=30)
        assert done.status_code == 204
        foreign = httpx.get(f"{server.url}/v1/inference_sse",
                            headers={**bearer(OTHER_KEY), "Last-Event-ID": complete.id},
                            timeout=30)
        assert foreign.status_code == 404


def test_socketio_resume_on_the_other_replica(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = replicas
    request_id = f"sio-resume-{uuid.uuid4().hex}"
    seen_a: list[dict[str, Any]] = []
    enough = threading.Event()
    client_a = socketio.Client(reconnection=False)

    def on_token_a(data: dict[str, Any]) -> None:
        seen_a.append(data)
        if len(seen_a) >= 3:
            enough.set()

    client_a.on("inference_token", on_token_a)
    client_a.connect(a.url, transports=["websocket"], auth={"apiKey": OWNER_KEY},
                     wait_timeout=10)
    ack = client_a.call("inference_prompt", {
        "prompt": "Write a story about a lighthouse keeper.", "max_tokens": 60,
        "temperature": 0, "request_id": request_id, "resumable": True}, timeout=30)
    assert ack == {"request_id": request_id}
    assert enough.wait(60)
    client_a.disconnect()
    last_index = seen_a[-1]["index"]
    rest: list[tuple[str, dict[str, Any]]] = []
    done = threading.Event()
    client_b = socketio.Client(reconnection=False)
    client_b.on("inference_token", lambda d: rest.append(("token", d)))

    def on_complete(data: dict[str, Any]) -> None:
        rest.append(("complete", data))
        done.set()

    client_b.on("inference_complete", on_complete)
    client_b.connect(b.url, transports=["websocket"], auth={"apiKey": OWNER_KEY},
                     wait_timeout=10)
    try:
        answer = client_b.call("inference_resume",
                               {"request_id": request_id, "last_index": last_index},
                               timeout=30)
        assert answer == {"request_id": request_id, "resumed": True}
        assert done.wait(60)
    finally:
        client_b.disconnect()
    tokens = [d for name, d in rest if name == "token"]
    assert [t["index"] for t in tokens] == list(range(last_index + 1, last_index + 1 + len(tokens)))
    text = "".join(t["text"] for t in seen_a[: last_index + 1]) + "".join(t["text"] for t in tokens)
    assert text == rest[-1][1]["text"]
