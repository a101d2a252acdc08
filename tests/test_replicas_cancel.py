"""Cancel from any replica: two real servers on one real Redis, the real model.

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

from .redis_server import RedisServer, redis_server_binary
from .server_process import ServerProcess, model_env
from .sse_client import parse_lines

pytestmark = pytest.mark.model

OWNER_KEY = "replica-test-owner"
OTHER_KEY = "replica-test-other"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def replicas(
    model_path: Path, server_logs: Path, redis: RedisServer
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    env = model_env(
        model_path,
        REDIS_URL=redis.url,
        REDIS_PREFIX="replicas:",
        API_KEYS=f"{OWNER_KEY},{OTHER_KEY}",
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
