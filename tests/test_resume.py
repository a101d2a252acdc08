"""Resumable streams and reconnects, over a real socket with the fake engine.

A reconnect (`Last-Event-ID`, or `last_event_id` in the query) never starts a
generation and never writes a session turn: it replays from the stream log, follows a
generation still running, answers 204 when nothing is missing, 404 for a stream it does
not know (or another owner's).
"""

from __future__ import annotations

import httpx
import trio

from fabricai_trio.core.stream_ids import parse_event_id

from .fakes import FakeEngine
from .inprocess import served, wait_for
from .sse_client import SSEEvent, aparse


async def read(response: httpx.Response, stop_after_tokens: int | None = None
               ) -> list[SSEEvent]:
    events = []
    async for event in aparse(response.aiter_lines()):
        if event.comment is not None:
            continue
        events.append(event)
        tokens = sum(e.event == "token" for e in events)
        if stop_after_tokens is not None and tokens >= stop_after_tokens:
            break
    return events


def positions(events: list[SSEEvent], request_id: str) -> list[int]:
    out = []
    for event in events:
        assert event.id is not None
        parsed = parse_event_id(event.id)
        assert parsed is not None and parsed[0] == request_id
        out.append(parsed[1])
    return out


def text_of(events: list[SSEEvent]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "token")


async def resume(client: httpx.AsyncClient, last_id: str,
                 headers: dict[str, str] | None = None) -> httpx.Response:
    return await client.post("/v1/inference_sse",
                             headers={**(headers or {}), "Last-Event-ID": last_id})


async def test_every_event_has_an_id_and_a_reconnect_after_the_end_is_204() -> None:
    async with served() as (app, client):
        body = {"prompt": "one two", "max_tokens": 3, "request_id": "ids-1"}
        async with client.stream("POST", "/v1/inference_sse", json=body) as response:
            events = await read(response)
        assert [e.event for e in events] == ["queued", "token", "token", "token", "complete"]
        assert positions(events, "ids-1") == [0, 1, 2, 3, 4]
        # EventSource reconnects with the id of the last event it got: nothing is
        # missing, so 204, and it stops reconnecting. No generation starts.
        engine = app.state.engine
        assert isinstance(engine, FakeEngine)
        started = list(engine.started)
        done = await resume(client, events[-1].id or "")
        assert done.status_code == 204
        query = await client.get("/v1/inference_sse",
                                 params={"last_event_id": events[-1].id or ""})
        assert query.status_code == 204
        # Missing events of a stream that was not resumable: only its end is kept,
        # and the final event carries the whole text.
        async with client.stream("GET", "/v1/inference_sse",
                                 headers={"Last-Event-ID": "ids-1:1"}) as response:
            replay = await read(response)
        assert [e.event for e in replay] == ["complete"]
        assert replay[0].data == events[-1].data and replay[0].id == events[-1].id
        assert engine.started == started


async def test_unknown_foreign_and_malformed_ids() -> None:
    async with served(api_keys="alpha-key,beta-key") as (_, client):
        alpha = {"Authorization": "Bearer alpha-key"}
        beta = {"Authorization": "Bearer beta-key"}
        body = {"prompt": "one", "max_tokens": 2, "request_id": "mine-1"}
        async with client.stream("POST", "/v1/inference_sse", json=body,
                                 headers=alpha) as response:
            events = await read(response)
        last = events[-1].id or ""
        assert (await resume(client, last, headers=alpha)).status_code == 204
        foreign = await client.post("/v1/inference_sse",
                                    headers={**beta, "Last-Event-ID": "mine-1:0"})
        assert foreign.status_code == 404
        assert foreign.json()["error"]["code"] == "stream_not_found"
        assert foreign.json()["error"]["param"] == "Last-Event-ID"
        unknown = await client.post("/v1/inference_sse",
                                    headers={**alpha, "Last-Event-ID": "nobody:3"})
        assert unknown.status_code == 404
        for bad in ("no-position", "x:-1", "x:1.5", "bad id!:2"):
            answer = await client.post("/v1/inference_sse",
                                       headers={**alpha, "Last-Event-ID": bad})
            assert answer.status_code == 422, bad
            assert answer.json()["error"]["param"] == "Last-Event-ID"


async def test_a_resumable_stream_survives_its_connection_and_resumes() -> None:
    async with served(step_seconds=0.01) as (app, client):
        engine = app.state.engine
        assert isinstance(engine, FakeEngine)
        body = {"prompt": "tell me", "max_tokens": 40, "request_id": "res-1",
                "resumable": True, "resume_grace_seconds": 30}
        async with client.stream("POST", "/v1/inference_sse", json=body) as response:
            first = await read(response, stop_after_tokens=5)
        # The client is gone; the generation is not.
        await wait_for(lambda: engine.tokens_generated >= 12)
        assert app.state.service.live_count == 1
        async with client.stream("POST", "/v1/inference_sse",
                                 headers={"Last-Event-ID": first[-1].id or ""}) as response:
            assert response.status_code == 200
            rest = await read(response)
        joined = first + rest
        assert positions(joined, "res-1") == list(range(len(joined)))  # no gap, no repeat
        complete = joined[-1]
        assert complete.event == "complete" and complete.data["finish_reason"] == "length"
        assert text_of(joined) == complete.data["text"]
        assert engine.started.count("res-1") == 1  # one generation, however many readers
        assert app.state.service.live_count == 0
        assert app.state.admission.stats().active == 0


async def test_a_resumable_stream_nobody_comes_back_for_is_cancelled_after_its_grace(
) -> None:
    async with served(step_seconds=0.01) as (app, client):
        sid = (await client.post("/v1/sessions")).json()["id"]
        body = {"prompt": "tell me", "max_tokens": 2000, "request_id": "grace-1",
                "resumable": True, "resume_grace_seconds": 0.3, "session_id": sid}
        async with client.stream("POST", "/v1/inference_sse", json=body) as response:
            first = await read(response, stop_after_tokens=2)
        await wait_for(lambda: app.state.service.live_count == 0)
        async with client.stream("GET", "/v1/inference_sse",
                                 params={"last_event_id": first[-1].id}) as response:
            rest = await read(response)
        assert rest[-1].event == "complete"
        assert rest[-1].data["finish_reason"] == "cancelled"
        assert rest[-1].data["cancel_cause"] == "disconnect"
        assert rest[-1].data["usage"]["completion_tokens"] < 2000
        # One turn stored, once; the reconnect wrote nothing.
        messages = (await client.get(f"/v1/sessions/{sid}/messages")).json()["data"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[1]["finish_reason"] == "cancelled"
        assert app.state.admission.stats().active == 0


async def test_a_reconnect_that_comes_back_in_time_keeps_it_going() -> None:
    async with served(step_seconds=0.01) as (app, client):
        body = {"prompt": "tell me", "max_tokens": 60, "request_id": "back-1",
                "resumable": True, "resume_grace_seconds": 10.0}
        async with client.stream("POST", "/v1/inference_sse", json=body) as response:
            first = await read(response, stop_after_tokens=2)
        await trio.sleep(0.2)  # gone for less than the grace
        assert app.state.service.live_count == 1
        async with client.stream("POST", "/v1/inference_sse",
                                 headers={"Last-Event-ID": first[-1].id or ""}) as response:
            rest = await read(response)
        assert rest[-1].data["finish_reason"] == "length"
        assert text_of(first + rest) == rest[-1].data["text"]


async def test_an_explicit_cancel_of_a_resumable_stream_is_immediate() -> None:
    async with served(step_seconds=0.01) as (app, client):
        body = {"prompt": "tell me", "max_tokens": 2000, "request_id": "cx-1",
                "resumable": True}
        async with client.stream("POST", "/v1/inference_sse", json=body) as response:
            events = []
            async for event in aparse(response.aiter_lines()):
                events.append(event)
                if event.event == "token" and event.data["index"] == 3:
                    cancel = await client.post("/v1/inference_sse/cx-1/cancel")
                    assert cancel.status_code == 200
        assert events[-1].event == "complete"
        assert events[-1].data["finish_reason"] == "cancelled"
        assert events[-1].data["cancel_cause"] == "cancel"
        assert app.state.service.live_count == 0


async def test_grace_is_capped_by_the_setting() -> None:
    async with served(resume_grace_max_seconds=5) as (_, client):
        body = {"prompt": "x", "resumable": True, "resume_grace_seconds": 6}
        answer = await client.post("/v1/inference_sse", json=body)
        assert answer.status_code == 422
        assert answer.json()["error"]["param"] == "resume_grace_seconds"
