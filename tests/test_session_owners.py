"""Sessions bound to their owner and incarnation, and the limits on what a key keeps:
issue #17's findings as regression tests, against real servers on the real model over
real sockets (python-socketio clients, httpx), on the memory and the Redis store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio

from .live import wait_idle
from .redis_server import RedisServer
from .server_process import ServerProcess, model_env

pytestmark = pytest.mark.model

KEY_1, KEY_2 = "key-one-0123456789", "key-two-0123456789"
#: Replicas on one store must derive the same owner id from a key.
OWNER_SECRET = "owner-id-secret-of-these-tests-0123456789"
LONG = {"prompt": "Once upon a time", "max_tokens": 512, "temperature": 0}


def headers(key: str) -> dict[str, str]:
    return {"X-Api-Key": key}


class Client:
    """A python-socketio client of one API key that records every inference event."""

    def __init__(self, url: str, key: str) -> None:
        self.sio = socketio.Client(reconnection=False)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        for name in ("inference_queued", "inference_token", "inference_complete",
                     "inference_error"):
            self.sio.on(name, self._recorder(name))
        self.sio.connect(url, auth={"apiKey": key}, transports=["websocket"], wait_timeout=10)

    def _recorder(self, name: str) -> Any:
        def record(data: dict[str, Any]) -> None:
            with self.changed:
                self.events.append((name, data))
                self.changed.notify_all()
        return record

    def call(self, event: str, payload: dict[str, Any]) -> dict[str, Any]:
        ack: dict[str, Any] = self.sio.call(event, payload, timeout=30)
        return ack

    def wait_for(self, name: str, request_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """The first `name` event of `request_id` (`timeout`: a hang guard)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for got, data in self.events:
                    if got == name and data.get("request_id") == request_id:
                        return data
                left = deadline - time.monotonic()
                assert left > 0, f"no {name} for {request_id}: {self.events[-3:]}"
                self.changed.wait(left)

    def request_ids(self) -> set[str]:
        with self.lock:
            return {data.get("request_id", "") for _, data in self.events}

    def close(self) -> None:
        self.sio.disconnect()


def servers(model_path: Path, server_logs: Path, store: str, stack: ExitStack
            ) -> tuple[ServerProcess, ServerProcess]:
    """(replica one, replica two): the same server twice on the memory store, two
    replicas sharing a private Redis on the Redis store."""
    settings = {"API_KEYS": f"{KEY_1},{KEY_2}", "OWNER_ID_SECRET": OWNER_SECRET,
                "MAX_TOKENS_LIMIT": "512",
                "MAX_CONCURRENT_REQUESTS": "2", "MAX_QUEUE_SIZE": "2"}
    if store == "memory":
        one = stack.enter_context(ServerProcess(model_env(model_path, **settings),
                                                log_dir=server_logs))
        return one, one
    redis = stack.enter_context(RedisServer())
    env = model_env(model_path, REDIS_URL=redis.url, **settings)
    one = stack.enter_context(ServerProcess(env, log_dir=server_logs))
    two = stack.enter_context(ServerProcess(env, log_dir=server_logs))
    return one, two


@pytest.fixture(scope="module", params=["memory", "redis"])
def replicas(request: pytest.FixtureRequest, model_path: Path, server_logs: Path
             ) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with ExitStack() as stack:
        yield servers(model_path, server_logs, request.param, stack)


def test_a_stale_room_hears_nothing_and_a_stale_turn_lands_nowhere(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    """Issue #17, high 4. Key 1 creates `team-chat`, watches its room (on replica one),
    runs a long generation on it (replica two) and deletes it mid-generation; key 2
    creates `team-chat` again. Then: key 1's watcher left the room at the delete (on
    every replica: it never sees its own generation's end), the stale generation's turn
    is not written into key 2's session, and key 2's tokens reach key 2's watcher only.
    """
    one, two = replicas
    sid = "team-chat"
    with ExitStack() as stack:
        http_one = stack.enter_context(httpx.Client(base_url=one.url, timeout=30,
                                                    headers=headers(KEY_1)))
        http_two = stack.enter_context(httpx.Client(base_url=two.url, timeout=30,
                                                    headers=headers(KEY_1)))
        spy = Client(one.url, KEY_1)  # key 1's watcher
        stack.callback(spy.close)
        writer = Client(two.url, KEY_1)
        stack.callback(writer.close)
        assert http_two.post("/v1/sessions", json={"session_id": sid},
                             headers=headers(KEY_1)).status_code == 201
        assert spy.call("join_session", {"session_id": sid}) == {"session_id": sid,
                                                                  "joined": True}
        ack = writer.call("inference_prompt", {**LONG, "session_id": sid,
                                               "request_id": "stale-turn"})
        assert ack == {"request_id": "stale-turn"}
        spy.wait_for("inference_token", "stale-turn")  # the room works before the delete

        assert http_two.delete(f"/v1/sessions/{sid}", headers=headers(KEY_1)).status_code == 204
        assert http_two.post("/v1/sessions", json={"session_id": sid, "system_prompt": "Be brief."},
                             headers=headers(KEY_2)).status_code == 201
        # The stale generation ends (cancelled: its turn would be stored) after the
        # new session exists under its id.
        assert writer.call("inference_cancel", {"request_id": "stale-turn"})["cancelled"]
        end = writer.wait_for("inference_complete", "stale-turn")
        assert end["finish_reason"] in ("cancelled", "length", "stop")

        owner = Client(two.url, KEY_2)
        stack.callback(owner.close)
        watcher = Client(one.url, KEY_2)  # key 2's own watcher, next to key 1's spy
        stack.callback(watcher.close)
        assert watcher.call("join_session", {"session_id": sid})["joined"]
        assert owner.call("inference_prompt", {"prompt": "Hi", "max_tokens": 8,
                                               "session_id": sid, "request_id": "key2-turn"}
                          ) == {"request_id": "key2-turn"}
        done = owner.wait_for("inference_complete", "key2-turn")
        # Everything published before key 2's end has reached replica one.
        assert watcher.wait_for("inference_complete", "key2-turn")["text"] == done["text"]
        assert spy.call("leave_session", {"session_id": sid})["left"]  # a round trip

        assert "key2-turn" not in spy.request_ids()
        assert not any(name == "inference_complete" for name, _ in spy.events)
        stored = http_one.get(f"/v1/sessions/{sid}/messages", headers=headers(KEY_2)).json()
        assert [(m["role"], m["request_id"]) for m in stored["data"]] == [
            ("system", None), ("user", "key2-turn"), ("assistant", "key2-turn")]
        # Key 1 sees key 2's session exactly as a missing one.
        theirs = http_one.get(f"/v1/sessions/{sid}", headers=headers(KEY_1))
        missing = http_one.get("/v1/sessions/never-made", headers=headers(KEY_1))
        assert (theirs.status_code, theirs.content) == (missing.status_code, missing.content)
        assert theirs.status_code == 404
        rejoin = spy.call("join_session", {"session_id": sid})
        assert rejoin["error"]["code"] == "session_not_found"
        wait_idle(http_one)
        wait_idle(http_two)


def test_ids_outside_the_api_pattern_are_404_not_500(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    """On Redis, `x:messages` named the message list of session `x` (500 WRONGTYPE)."""
    one, _ = replicas
    with httpx.Client(base_url=one.url, timeout=30, headers=headers(KEY_1)) as http:
        # A system prompt: `session:pattern-x:messages` exists in Redis (a list).
        assert http.post("/v1/sessions", json={"session_id": "pattern-x",
                                               "system_prompt": "s"}).status_code == 201
        for path in ("/v1/sessions/pattern-x:messages", "/v1/sessions/pattern-x.y",
                     "/v1/sessions/pattern-x:messages/messages", "/v1/sessions/" + "a" * 129):
            for method in ("GET", "DELETE") if not path.endswith("/messages") else ("GET",):
                response = http.request(method, path)
                assert response.status_code == 404, (method, path, response.text)
                assert response.json()["error"]["code"] == "session_not_found"
        sse = http.post("/v1/inference_sse", json={"prompt": "Hi", "max_tokens": 1,
                                                   "session_id": "pattern-x:messages"})
        assert sse.status_code == 422 and sse.json()["error"]["param"] == "session_id"
        assert http.delete("/v1/sessions/pattern-x").status_code == 204


@pytest.fixture(scope="module", params=["memory", "redis"])
def capped(request: pytest.FixtureRequest, model_path: Path, server_logs: Path
           ) -> Iterator[ServerProcess]:
    settings = {"API_KEYS": f"{KEY_1},{KEY_2}", "OWNER_ID_SECRET": OWNER_SECRET,
                "SESSION_MAX_PER_OWNER": "3",
                "SESSION_MAX_BYTES": "4096", "MEMORY_STORE_MAX_BYTES": "65536"}
    with ExitStack() as stack:
        if request.param == "redis":
            settings["REDIS_URL"] = stack.enter_context(RedisServer()).url
        yield stack.enter_context(ServerProcess(model_env(model_path, **settings),
                                                log_dir=server_logs))


def test_sessions_per_key_and_bytes_per_session_are_capped(capped: ServerProcess) -> None:
    """Issue #17, medium: 150 sessions with 1 MB system prompts were all kept."""
    with httpx.Client(base_url=capped.url, timeout=30) as http:
        one, two = headers(KEY_1), headers(KEY_2)
        made = [http.post("/v1/sessions", headers=one).json()["id"] for _ in range(3)]
        refused = http.post("/v1/sessions", headers=one)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_sessions"
        assert http.post("/v1/sessions", json={"session_id": "over"},
                         headers=one).status_code == 429
        assert http.post("/v1/sessions", headers=two).status_code == 201  # per key
        assert http.delete(f"/v1/sessions/{made[0]}", headers=one).status_code == 204
        assert http.post("/v1/sessions", json={"session_id": "big", "system_prompt": "x" * 3000},
                         headers=one).status_code == 201

        too_big = http.post("/v1/sessions", json={"system_prompt": "y" * 5000}, headers=two)
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "session_too_large"

        # A request that would take the session past its cap is refused before it runs.
        over = http.post("/v1/inference_sse", headers=one, json={
            "messages": [{"role": "user", "content": "z" * 1500}], "max_tokens": 1,
            "session_id": "big"})
        assert over.status_code == 413, over.text
        assert over.json()["error"]["code"] == "session_too_large"
        fits = http.post("/v1/inference_sse", headers=one, json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2,
            "session_id": "big"})
        assert fits.status_code == 200 and "event: complete" in fits.text
        kept = http.get("/v1/sessions/big/messages", headers=one).json()["data"]
        assert [m["role"] for m in kept] == ["system", "user", "assistant"]
        status = http.get("/v1/status", headers=one).json()
        assert status["concurrency"]["active"] == status["concurrency"]["queued"] == 0


def test_the_memory_store_has_a_global_cap(model_path: Path, server_logs: Path) -> None:
    env = model_env(model_path, API_KEYS=f"{KEY_1},{KEY_2}", SESSION_MAX_BYTES="40000",
                    MEMORY_STORE_MAX_BYTES="65536")
    with ServerProcess(env, log_dir=server_logs) as proc, \
            httpx.Client(base_url=proc.url, timeout=30) as http:
        prompt = {"system_prompt": "x" * 30_000}
        first = http.post("/v1/sessions", json=prompt, headers=headers(KEY_1))
        assert http.post("/v1/sessions", json=prompt, headers=headers(KEY_2)).status_code == 201
        full = http.post("/v1/sessions", json=prompt, headers=headers(KEY_2))
        assert full.status_code == 429
        assert full.json()["error"]["code"] == "session_store_full"
        assert full.headers["Retry-After"]
        sid = first.json()["id"]
        assert http.delete(f"/v1/sessions/{sid}", headers=headers(KEY_1)).status_code == 204
        assert http.post("/v1/sessions", json=prompt, headers=headers(KEY_2)).status_code == 201
