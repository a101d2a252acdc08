"""The SSE routes' queueing, keep-alive, cancel and disconnect behaviour, in process.

The whole app (routes, admission, generation service, cancel registry, request
cleanups) runs through the ASGI harness on the fake engine under `autojump_clock`:
each test takes milliseconds and asserts exact counts, because the test controls every
token. What needs the real engine (that llama.cpp really stops decoding) stays in
test_sse_real.py / test_sse_cancel.py.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from .asgi_harness import Client, Stream
from .routes_harness import KEEPALIVE_S, STEP_S, FailingEngine, data_events, names, running
from .sse_client import SSEEvent

SSE = "/v1/inference_sse"


async def cancel(client: Client, rid: str, **kwargs: object) -> tuple[int, object]:
    response = await client.post(f"{SSE}/{rid}/cancel", **kwargs)  # type: ignore[arg-type]
    return response.status, response.json()


async def first_event(stream: Stream) -> SSEEvent:
    event = await stream.next_event(comments=False)
    assert event is not None
    return event


async def until_token(stream: Stream, index: int) -> list[SSEEvent]:
    """Read events up to and including token `index`."""
    seen: list[SSEEvent] = []
    async for event in stream.events(comments=False):
        seen.append(event)
        if event.event == "token" and event.data["index"] == index:
            return seen
    raise AssertionError(f"the stream ended before token {index}: {names(seen)}")


def tokens_text(events: list[SSEEvent]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "token")


async def test_a_stream_is_queued_tokens_complete(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (client, engine, _):
        body = {"prompt": "one two three", "max_tokens": 4, "request_id": "r-1"}
        async with client.stream("POST", SSE, json=body) as stream:
            assert stream.status == 200
            assert stream.header("content-type") == "text/event-stream; charset=utf-8"
            assert stream.header("x-accel-buffering") == "no"
            assert stream.header("cache-control") == "no-cache"
            assert stream.header("x-request-id") == "r-1"
            events = await stream.rest(comments=True)
        assert names(events) == ["queued", "token", "token", "token", "token", "complete"]
        assert all(e.comment is None for e in events)  # never queued: no keep-alive
        assert all(e.data["request_id"] == "r-1" for e in events)
        assert events[0].data["position"] == 0
        tokens = events[1:-1]
        # Every event's id names the stream and its position (what Last-Event-ID resumes).
        assert [e.id for e in events] == [f"r-1:{i}" for i in range(6)]
        assert [e.data["index"] for e in tokens] == [0, 1, 2, 3]
        complete = events[-1].data
        assert complete["text"] == tokens_text(events) == " alpha beta gamma delta"
        assert complete["finish_reason"] == "length"
        assert complete["usage"]["completion_tokens"] == 4
        assert complete["usage"]["prompt_tokens"] == 4  # the fake tokenizer: words + BOS
        assert engine.started == ["r-1"]
        assert (await client.status())["concurrency"] == {
            "max": 1, "active": 0, "queued": 0, "queue_capacity": 2,
        }


async def test_get_for_event_source(autojump_clock: trio.testing.MockClock) -> None:
    async with running() as (client, _, _):
        params = {"prompt": "hi", "max_tokens": "2", "stop": ["x", "y"]}
        response = await client.get(SSE, params=params)
        assert response.status == 200
        events = data_events(response.events())
        assert names(events) == ["queued", "token", "token", "complete"]
        assert events[-1].data["usage"]["completion_tokens"] == 2


async def test_queue_positions_and_429_with_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One slot, a queue of two: positions 0 and 1, the fourth request is refused at
    once with 429 + Retry-After, and the queue is served first in, first out."""
    async with running(max_queue_size=2) as (client, engine, _):
        body = {"prompt": "p", "max_tokens": 3}
        async with client.stream("POST", SSE, json={**body, "request_id": "run"}) as running_, \
                client.stream("POST", SSE, json={**body, "request_id": "q0"}) as q0, \
                client.stream("POST", SSE, json={**body, "request_id": "q1"}) as q1:
            assert (await first_event(running_)).data["position"] == 0
            assert (await first_event(q0)).data == {"request_id": "q0", "position": 0}
            assert (await first_event(q1)).data == {"request_id": "q1", "position": 1}
            await client.wait_status(active=1, queued=2)

            started = trio.current_time()
            refused = await client.post(SSE, json={**body, "request_id": "refused"})
            assert trio.current_time() == started  # refused without waiting
            assert refused.status == 429
            assert refused.header("retry-after") == "3"
            assert refused.json() == {"error": {
                "type": "rate_limit_error", "code": "queue_full",
                "message": refused.json()["error"]["message"], "param": None,
            }}
            # The refusal took no place and started nothing.
            assert (await client.status())["concurrency"]["queued"] == 2
            assert (await cancel(client, "refused"))[0] == 404

            for stream in (running_, q0, q1):
                assert names(await stream.rest())[-1] == "complete"
        assert engine.started == ["run", "q0", "q1"]
        assert engine.max_in_use == 1
        await client.wait_status(active=0, queued=0)


async def test_keepalive_comments_every_sse_keepalive_seconds_while_queued(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Queued behind a 12-token generation (12 steps): `: keepalive` at 1 and 2
    SSE_KEEPALIVE_SECONDS after
    the `queued` event (5 steps each), none once admitted."""
    async with running() as (client, _, _):
        async with client.stream("POST", SSE, json={"prompt": "p", "max_tokens": 12}) as holder:
            assert (await first_event(holder)).event == "queued"
            async with client.stream("POST", SSE, json={"prompt": "w", "max_tokens": 2}) as waiting:
                assert (await first_event(waiting)).event == "queued"
                queued_at = trio.current_time()
                seen: list[tuple[float, str]] = []
                async for event in waiting.events():
                    kind = "comment" if event.comment is not None else str(event.event)
                    seen.append((trio.current_time() - queued_at, event.comment or kind))
            await holder.rest()
        keepalives = [t for t, what in seen if what == "keepalive"]
        assert keepalives == [pytest.approx(KEEPALIVE_S), pytest.approx(2 * KEEPALIVE_S)]
        assert [what for _, what in seen] == [
            "keepalive", "keepalive", "token", "token", "complete",
        ]


async def test_cancel_mid_stream_ends_with_cancelled_and_stores_the_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running() as (client, engine, _):
        sid = (await client.post("/v1/sessions")).json()["id"]
        body = {"prompt": "hello", "max_tokens": 500, "request_id": "c-1", "session_id": sid}
        async with client.stream("POST", SSE, json=body) as stream:
            seen = await until_token(stream, 2)
            assert await cancel(client, "c-1") == (200, {"request_id": "c-1", "cancelled": True})
            rest = await stream.rest()
        events = seen + rest
        assert names(events) == ["queued", "token", "token", "token", "complete"]
        complete = events[-1].data
        assert complete["finish_reason"] == "cancelled"
        assert complete["text"] == tokens_text(events)
        assert complete["usage"]["completion_tokens"] == 3
        assert engine.tokens_generated == 3  # the engine stopped between two tokens
        await client.wait_status(active=0, queued=0)
        messages = (await client.get(f"/v1/sessions/{sid}/messages")).json()["data"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[-1]["finish_reason"] == "cancelled"
        assert messages[-1]["content"] == complete["text"]
        # Ended: a late cancel is a 404, and the session is free for the next turn.
        status, error = await cancel(client, "c-1")
        assert status == 404
        assert error == {"error": {
            "type": "not_found_error", "code": "request_not_found",
            "message": "no running generation of yours has this request_id",
            "param": "request_id",
        }}
        again = await client.post(SSE, json={**body, "max_tokens": 1, "request_id": "c-2"})
        assert again.status == 200
        assert names(again.events())[-1] == "complete"


async def test_cancel_while_queued_frees_the_queue_place(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(max_queue_size=1) as (client, engine, _):
        hold = {"prompt": "hold", "max_tokens": 50, "request_id": "hold-1"}
        async with client.stream("POST", SSE, json=hold) as holder:
            await first_event(holder)
            wait = {"prompt": "wait", "max_tokens": 5, "request_id": "queued-1"}
            async with client.stream("POST", SSE, json=wait) as queued:
                assert (await first_event(queued)).data["position"] == 0
                await client.wait_status(active=1, queued=1)
                assert (await client.post(SSE, json={"prompt": "x"})).status == 429
                assert (await cancel(client, "queued-1"))[0] == 200
                rest = await queued.rest()
            assert names(rest) == ["complete"]
            assert rest[0].data["finish_reason"] == "cancelled"
            assert rest[0].data["text"] == ""
            assert rest[0].data["usage"]["completion_tokens"] == 0
            await client.wait_status(active=1, queued=0)
            # The place is free: another request may queue again.
            async with client.stream("POST", SSE, json={"prompt": "next", "max_tokens": 1,
                                                        "request_id": "next"}) as nxt:
                assert (await first_event(nxt)).event == "queued"
                assert (await cancel(client, "hold-1"))[0] == 200
                assert names(await nxt.rest())[-1] == "complete"
            assert (await holder.rest())[-1].data["finish_reason"] == "cancelled"
        assert engine.started == ["hold-1", "next"]  # the cancelled one never ran
        await client.wait_status(active=0, queued=0)


async def test_cancel_before_the_first_event_is_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The stream is registered before its response starts: a cancel sent as soon as
    the response headers are in (nothing read yet) still ends it."""
    async with running() as (client, engine, _):
        body = {"prompt": "hello", "max_tokens": 500, "request_id": "early-1"}
        async with client.stream("POST", SSE, json=body) as stream:
            assert (await cancel(client, "early-1"))[0] == 200
            events = await stream.rest()
        assert names(events) == ["queued", "complete"]
        assert events[-1].data["finish_reason"] == "cancelled"
        assert engine.tokens_generated == 0
        await client.wait_status(active=0, queued=0)


async def test_a_finished_stream_cannot_be_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """It leaves the registry before its last event: once `complete` is read, 404."""
    async with running() as (client, _, _):
        body = {"prompt": "one two", "max_tokens": 3, "request_id": "done-1"}
        async with client.stream("POST", SSE, json=body) as stream:
            async for event in stream.events(comments=False):
                if event.event == "complete":
                    status, error = await cancel(client, "done-1")
                    assert status == 404
                    assert error["error"]["param"] == "request_id"  # type: ignore[index]


async def test_engine_error_is_an_error_event_and_frees_everything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(FailingEngine) as (client, _, _):
        sid = (await client.post("/v1/sessions")).json()["id"]
        body = {"prompt": "hello", "max_tokens": 50, "request_id": "err-1", "session_id": sid}
        async with client.stream("POST", SSE, json=body) as stream:
            events = await stream.rest()
        assert names(events) == ["queued", "token", "token", "error"]
        error = events[-1].data
        assert error["request_id"] == "err-1"
        assert (error["code"], error["status"]) == ("engine_error", 500)
        assert error["message"] == "the fake engine broke"
        assert (await cancel(client, "err-1"))[0] == 404
        await client.wait_status(active=0, queued=0)
        messages = (await client.get(f"/v1/sessions/{sid}/messages")).json()["data"]
        assert messages[-1]["finish_reason"] == "error"
        assert messages[-1]["content"] == " word word"
        # The session is not left locked.
        again = await client.post(SSE, json={**body, "request_id": "err-2"})
        assert again.status == 200


async def test_owners_cannot_cancel_each_other(autojump_clock: trio.testing.MockClock) -> None:
    alpha = {"authorization": "Bearer alpha-key"}
    beta = {"authorization": "Bearer beta-key"}
    async with running(api_keys="alpha-key,beta-key") as (client, _, _):
        body = {"prompt": "hello", "max_tokens": 500, "request_id": "shared-id"}
        async with client.stream("POST", SSE, json=body, headers=alpha) as stream:
            await until_token(stream, 0)
            assert (await cancel(client, "shared-id"))[0] == 401
            status, error = await cancel(client, "shared-id", headers=beta)
            assert status == 404
            assert error["error"]["code"] == "request_not_found"  # type: ignore[index]
            assert (await cancel(client, "shared-id", headers=alpha))[0] == 200
            rest = await stream.rest()
        assert rest[-1].data["finish_reason"] == "cancelled"


@pytest.mark.parametrize("point", ["before_the_response", "while_queued", "after_3_tokens"])
async def test_disconnect_at_any_point_frees_the_slot_or_the_queue_place(
    autojump_clock: trio.testing.MockClock, point: str
) -> None:
    """Whenever the client leaves, its queue place or slot is free by the time the
    app's call for it has returned, and the engine decodes nothing more for it."""
    async with running(max_queue_size=1) as (client, engine, _):
        hold = {"prompt": "hold", "max_tokens": 20, "request_id": "hold"}
        async with client.stream("POST", SSE, json=hold) as holder:
            await first_event(holder)
            if point == "after_3_tokens":  # the leaver gets the slot
                assert (await cancel(client, "hold"))[0] == 200
                await holder.rest()
                await client.wait_status(active=0, queued=0)
            call = client.call("POST", SSE, json={"prompt": "leave", "max_tokens": 50,
                                                  "request_id": "leaver"})
            await client.nursery.start(call.run)
            if point == "before_the_response":
                await call.disconnect()
            else:
                await call.wait_started()
                leaver = Stream(call)
                if point == "while_queued":
                    assert (await first_event(leaver)).event == "queued"
                    await client.wait_status(active=1, queued=1)
                else:
                    await until_token(leaver, 2)
                await call.disconnect()
            await call.wait_done()
            # Freed before the call returned: no polling needed.
            concurrency = (await client.status())["concurrency"]
            if point == "after_3_tokens":
                assert (concurrency["active"], concurrency["queued"]) == (0, 0)
                await trio.sleep(100 * STEP_S)
                assert engine.tokens_generated == 3  # the holder was cancelled before a token
            else:
                assert (concurrency["active"], concurrency["queued"]) == (1, 0)
                assert engine.started == ["hold"]  # the leaver never reached the engine
            # Its place is free: a new request is not refused.
            assert (await client.post(SSE, json={"prompt": "x", "max_tokens": 1})).status == 200
        await client.wait_status(active=0, queued=0)
