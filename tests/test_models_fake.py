"""Several models in one app, on fake engines (in process, virtual time): each model has
its own slots and queue, a request's `model` picks one, an unknown one is a 404, and a
session keeps the model it started with. The real-model version is test_models_real.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing

from fabricai_trio.app import FabricApp, create_app
from fabricai_trio.sessions import MemorySessionStore

from .asgi_harness import Client, serve
from .fakes import FakeEngine
from .routes_harness import STEP_S, settings

SSE = "/v1/inference_sse"
CHAT = "/v1/chat/completions"
LONG = {"prompt": "p", "max_tokens": 40}


@asynccontextmanager
async def two_models(**overrides: Any) -> AsyncIterator[tuple[Client, dict[str, FakeEngine],
                                                               FabricApp]]:
    """Models `busy` and `idle` (the default), one slot and a queue of one each."""
    config = settings(max_queue_size=1, models="busy,idle", default_model="idle", **overrides)
    engines = {name: FakeEngine(config, step_seconds=STEP_S) for name in ("busy", "idle")}
    app = create_app(config, engines=engines, store=MemorySessionStore())
    async with serve(app) as client:
        for engine in engines.values():
            engine.started.clear()
        yield client, engines, app
        status = (await client.get("/v1/status")).json()
        for name in engines:
            while status["models"][name]["concurrency"]["active"]:
                await trio.sleep(STEP_S)
                status = (await client.get("/v1/status")).json()
        assert app.state.service.live_count == 0


async def test_a_busy_model_never_queues_a_request_for_an_idle_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with two_models() as (client, engines, app):
        busy = {**LONG, "model": "busy"}
        async with client.stream("POST", SSE, json=busy) as running, \
                client.stream("POST", SSE, json=busy) as queued:
            assert running.status == queued.status == 200
            while app.state.models.get("busy").admission.stats().queued != 1:
                await trio.sleep(STEP_S)
            # `busy` is full (one running, one queued): a third is refused at once…
            refused = await client.post(SSE, json=busy)
            assert refused.status == 429
            # …while `idle` (named, and as the default) runs at once, never queued.
            for body in ({**LONG, "max_tokens": 3, "model": "idle"}, {**LONG, "max_tokens": 3}):
                started = trio.current_time()
                events = (await client.post(SSE, json=body)).events()
                queued_event = next(e for e in events if e.event == "queued")
                assert queued_event.data["position"] == 0
                assert events[-1].event == "complete"
                assert trio.current_time() - started < 10 * STEP_S
            assert len(engines["idle"].started) == 2
            assert len(engines["busy"].started) == 1
        metrics = (await client.get("/metrics")).text
        assert 'fabricai_queue_rejections_total{model="busy"} 1.0' in metrics
        assert 'fabricai_queue_rejections_total{model="idle"} 0.0' in metrics
        assert 'fabricai_max_concurrent_generations{model="idle"} 1.0' in metrics


async def test_unknown_model_is_404_naming_the_field(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with two_models() as (client, engines, _):
        for response in (
            await client.post(SSE, json={**LONG, "model": "nope"}),
            await client.get(SSE, params={"prompt": "hi", "model": "nope"}),
            await client.post(CHAT, json={"model": "nope",
                                          "messages": [{"role": "user", "content": "hi"}]}),
        ):
            assert response.status == 404
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("model_not_found", "model")
            assert "busy" in error["message"] and "idle" in error["message"]
        assert not engines["busy"].started and not engines["idle"].started


async def test_a_session_keeps_its_model(autojump_clock: trio.testing.MockClock) -> None:
    async with two_models() as (client, engines, _):
        sid = (await client.post("/v1/sessions")).json()["id"]
        turn = {"prompt": "hello", "max_tokens": 2, "session_id": sid}
        first = (await client.post(SSE, json={**turn, "model": "busy"})).events()
        assert first[-1].event == "complete"
        # No `model`: the session's, not the default.
        again = (await client.post(SSE, json=turn)).events()
        assert again[-1].event == "complete"
        assert len(engines["busy"].started) == 2 and not engines["idle"].started
        # Another model on this session: a 409 naming `model`, on every route.
        for response in (
            await client.post(SSE, json={**turn, "model": "idle"}),
            await client.post(CHAT, json={"model": "idle", "session_id": sid,
                                          "messages": [{"role": "user", "content": "x"}]}),
        ):
            assert response.status == 409
            error = response.json()["error"]
            assert (error["code"], error["param"]) == ("session_model_mismatch", "model")
        messages = (await client.get(f"/v1/sessions/{sid}/messages")).json()["data"]
        assert [m["model"] for m in messages if m["role"] == "assistant"] == ["busy", "busy"]


async def test_models_and_status_list_every_model(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with two_models() as (client, _, _):
        cards = (await client.get("/v1/models")).json()["data"]
        assert [(c["id"], c["default"]) for c in cards] == [("busy", False), ("idle", True)]
        assert all(c["context_length"] == 4096 and c["slots"] == 1 for c in cards)
        status = (await client.get("/v1/status")).json()
        assert status["default_model"] == "idle"
        assert set(status["models"]) == {"busy", "idle"}
        assert status["model"]["name"] == "idle"
