"""The prefix cache is private to each principal (issue 16.3): the same prompt from two API
keys never reuses the other's KV (no timing side channel), the same key does, and a
request marked `shared_prefix` shares with everyone who marks theirs so. Checked with the
engine's own cache-hit counters on the real model, over a real socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .server_process import ServerProcess, model_env

pytestmark = pytest.mark.model

KEYS = {"a": "prefix-key-a-0123456789abcdef0123", "b": "prefix-key-b-0123456789abcdef0123"}
#: Long enough to be cached (more than the engine's minimum reuse of 32 tokens).
PROMPT = "A long shared preamble about the weather in several cities. " * 8


@pytest.fixture(scope="module", params=["batched", "llama"])
def keyed_server(request: pytest.FixtureRequest, model_path: Path, server_logs: Path
                 ) -> Iterator[ServerProcess]:
    """One slot, so that with ENGINE=llama every request runs on the same context (which
    llama-cpp-python would otherwise reuse whoever sent the prompt)."""
    env = model_env(model_path, API_KEYS=",".join(KEYS.values()), MAX_CONCURRENT_REQUESTS="1",
                    PREFIX_CACHE_SEQUENCES="4", ENGINE=request.param)
    with ServerProcess(env, log_dir=server_logs) as server:
        yield server


def hits(client: httpx.Client) -> int:
    extra: dict[str, Any] = client.get("/v1/status").json()["engine"]
    return int(extra["prefix_cache_hits"])


def complete(client: httpx.Client, key: str, **extra: Any) -> None:
    response = client.post("/v1/completions", headers={"Authorization": f"Bearer {KEYS[key]}"},
                           json={"prompt": PROMPT, "max_tokens": 2, **extra})
    assert response.status_code == 200, response.text


def test_a_prompt_is_reused_by_its_own_key_only(keyed_server: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {KEYS['a']}"}
    with httpx.Client(base_url=keyed_server.url, headers=auth, timeout=60) as client:
        complete(client, "a")
        start = hits(client)
        complete(client, "b")  # the same prompt, another key: a miss
        assert hits(client) == start
        complete(client, "b")  # b's own prefix now
        assert hits(client) == start + 1


def test_shared_prefix_is_shared_on_purpose(keyed_server: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {KEYS['a']}"}
    with httpx.Client(base_url=keyed_server.url, headers=auth, timeout=60) as client:
        public = "A public system prompt that every key may share on purpose. " * 8
        start = hits(client)
        complete(client, "a", shared_prefix=True, prompt=public)
        complete(client, "b", shared_prefix=True, prompt=public)
        assert hits(client) == start + 1
        complete(client, "b", prompt=public)  # unmarked: b's private scope, a miss
        assert hits(client) == start + 1
