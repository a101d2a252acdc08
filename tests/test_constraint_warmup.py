"""CONSTRAINT_WARMUP: llguidance's tokenizer (`ModelText.constraint_tokenizer`) is built
in the background once the model has loaded, in the services nursery, so the first
constrained request does not wait for it; readiness does not wait for it either.

- on, real servers (both engines, real model, real socket): the engine's status shows
  `constraint_tokenizer_seconds` with no constrained request made, and a `json_object`
  request then uses that same build;
- shutting down while the build runs waits for it in its thread (the vocabulary is
  closed after it, never under it), then ends cleanly, with nothing logged as an error
  (a build made slow on purpose, so the shutdown surely comes during it);
- off: nothing is built until the first constrained request.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from fabricai_trio.app import create_app
from fabricai_trio.engine import model_text
from fabricai_trio.engine.batched import BatchedEngine
from fabricai_trio.settings import Settings

from .conftest import serve_real_model
from .inprocess import listening, wait_for
from .live import status
from .server_process import ServerProcess

pytestmark = pytest.mark.model

ASK = {"model": "gemma-3-270m-q4_k_m", "max_tokens": 24, "temperature": 0.0,
       "response_format": {"type": "json_object"},
       "messages": [{"role": "user", "content": "A city described in JSON:"}]}


def built_seconds(client: httpx.Client) -> Any:
    return status(client)["engine"]["constraint_tokenizer_seconds"]


def assert_json_object_reply(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json=ASK)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    content = choice["message"]["content"]
    assert content.lstrip().startswith("{")
    if choice["finish_reason"] == "stop":  # else cut by max_tokens: a prefix of JSON
        assert isinstance(json.loads(content), dict)


@pytest.fixture(scope="module", params=["batched", "llama"])
def warm_server(request: pytest.FixtureRequest, model_path: Path, server_logs: Path
                ) -> Iterator[ServerProcess]:
    yield from serve_real_model(model_path, server_logs, ENGINE=request.param,
                                CONSTRAINT_WARMUP="true")


def test_the_tokenizer_is_built_without_a_constrained_request(
    warm_server: ServerProcess,
) -> None:
    with httpx.Client(base_url=warm_server.url, timeout=120) as client:
        deadline = time.monotonic() + 120  # a hang guard, not a budget
        while (seconds := built_seconds(client)) is None:
            assert time.monotonic() < deadline, "the warm-up build never finished"
            time.sleep(0.05)
        assert isinstance(seconds, float) and seconds > 0
        assert "constrained decoding prepared" in warm_server.log()
        assert_json_object_reply(client)
        assert built_seconds(client) == seconds  # the request used the same build
    assert "Traceback" not in warm_server.log()


def test_off_nothing_is_built_before_the_first_constrained_request(
    model_path: Path, server_logs: Path,
) -> None:
    for proc in serve_real_model(model_path, server_logs, CONSTRAINT_WARMUP="false"):
        with httpx.Client(base_url=proc.url, timeout=120) as client:
            plain = client.post("/v1/chat/completions",
                                json={**ASK, "response_format": {"type": "text"}})
            assert plain.status_code == 200, plain.text
            assert built_seconds(client) is None
            assert_json_object_reply(client)
            seconds = built_seconds(client)
            assert isinstance(seconds, float) and seconds > 0
        assert "constrained decoding prepared" not in proc.log()


async def test_shutdown_during_the_warm_up_build_waits_for_it_and_ends_cleanly(
    model_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    started, release = threading.Event(), threading.Event()
    events: list[str] = []
    build, close = model_text._Vocab.constraint_tokenizer, model_text._Vocab.close

    def slow_build(vocab: Any) -> Any:
        started.set()
        release.wait(60)  # until the shutdown has begun
        try:
            return build(vocab)
        finally:
            events.append("built")

    def recorded_close(vocab: Any) -> None:
        events.append("vocabulary closed")
        close(vocab)

    monkeypatch.setattr(model_text._Vocab, "constraint_tokenizer", slow_build)
    monkeypatch.setattr(model_text._Vocab, "close", recorded_close)
    caplog.set_level(logging.INFO)
    settings = Settings(  # type: ignore[call-arg]
        llm_model=model_path, chat_format="gemma", n_ctx=256, session_store="memory",
        max_concurrent_requests=1, constraint_warmup=True,
    )
    app = create_app(settings, engine=BatchedEngine(settings))
    try:
        async with listening(app) as (url, stop):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                with trio.fail_after(120):
                    await app.ready.wait()
                await wait_for(started.is_set, timeout=60)
                assert (await client.get("/readyz")).status_code == 200  # not waiting for it
                engine = (await client.get("/v1/status")).json()["engine"]
                assert engine["constraint_tokenizer_seconds"] is None
            stop.set()
            await wait_for(lambda: app.services_scope.cancel_called)
            await trio.testing.wait_all_tasks_blocked()
            assert not app.services_done.is_set()  # the build in its thread is waited for
            assert events == []
            release.set()
            with trio.fail_after(60):
                await app.services_done.wait()
    finally:
        release.set()
    assert events == ["built", "vocabulary closed"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
