"""Fair sharing between identities, per-key caps and rate limits, through the routes.

The whole app runs in process on the fake engine (`autojump_clock`: virtual time, exact
counts); two app instances on one private Redis stand for two replicas. What needs
the real model over a real socket is in test_fairness_real.py.
"""

from __future__ import annotations

import json
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import jwt
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from fabricai_trio.app import create_app
from fabricai_trio.core.errors import RateLimit, RateLimited, error_event
from fabricai_trio.sessions import MemorySessionStore

from .asgi_harness import Client, Stream, serve
from .fakes import FakeEngine
from .redis_server import RedisServer
from .routes_harness import STEP_S, names, running, settings

SSE = "/v1/inference_sse"
KEY_A, KEY_B = "fair-key-a", "fair-key-b"
A = {"authorization": f"Bearer {KEY_A}"}
B = {"authorization": f"Bearer {KEY_B}"}


def refusal(stream: Stream) -> dict[str, object]:
    body: dict[str, object] = json.loads(stream.call.response().text)["error"]
    return body


async def test_one_key_floods_twenty_the_other_is_served_next_and_never_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Key A sends 20 requests, then key B one. A gets its running one and its share
    of the queue (MAX_QUEUED_PER_KEY) and 429 `per_key_limit` for the rest; B gets
    in, at position 0, and runs right after A's running request: one A turn per slot."""
    async with running(api_keys=f"{KEY_A},{KEY_B}", max_concurrent_requests=1,
                       max_queue_size=24, max_queued_per_key=10) as (client, engine, _):
        body = {"prompt": "p", "max_tokens": 3}
        async with AsyncExitStack() as stack:
            accepted: list[Stream] = []
            refused: list[Stream] = []
            for i in range(20):
                stream = await stack.enter_async_context(client.stream(
                    "POST", SSE, json={**body, "request_id": f"a{i}"}, headers=A))
                (accepted if stream.status == 200 else refused).append(stream)
            assert len(accepted) == 11  # one running, ten waiting
            assert {s.status for s in refused} == {429}
            assert all(s.header("retry-after") == "3" for s in refused)
            assert {refusal(s)["code"] for s in refused} == {"per_key_limit"}
            await client.wait_status(active=1, queued=10, headers=A)

            b = await stack.enter_async_context(client.stream(
                "POST", SSE, json={**body, "request_id": "b"}, headers=B))
            assert b.status == 200
            queued = await b.next_event(comments=False)
            assert queued is not None and queued.data == {"request_id": "b", "position": 0}
            assert names(await b.rest())[-1] == "complete"
            for stream in accepted:
                assert names(await stream.rest())[-1] == "complete"
        assert engine.started[:2] == ["a0", "b"]
        assert engine.started[2:] == [f"a{i}" for i in range(1, 11)]


async def test_fifo_policy_keeps_arrival_order(autojump_clock: trio.testing.MockClock) -> None:
    async with running(api_keys=f"{KEY_A},{KEY_B}", max_concurrent_requests=1,
                       max_queue_size=8, queue_policy="fifo") as (client, engine, _):
        body = {"prompt": "p", "max_tokens": 2}
        async with AsyncExitStack() as stack:
            streams = [await stack.enter_async_context(client.stream(
                "POST", SSE, json={**body, "request_id": f"a{i}"}, headers=A))
                for i in range(3)]
            b = await stack.enter_async_context(client.stream(
                "POST", SSE, json={**body, "request_id": "b"}, headers=B))
            queued = await b.next_event(comments=False)
            assert queued is not None and queued.data["position"] == 2
            for stream in (*streams, b):
                await stream.rest()
        assert engine.started == ["a0", "a1", "a2", "b"]


async def test_concurrency_cap_per_key_lets_another_key_use_the_free_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(api_keys=f"{KEY_A},{KEY_B}", max_concurrent_requests=2,
                       max_queue_size=8, max_concurrent_per_key=1) as (client, engine, _):
        body = {"prompt": "p", "max_tokens": 4}
        async with client.stream("POST", SSE, json={**body, "request_id": "a0"},
                                 headers=A) as a0, \
                client.stream("POST", SSE, json={**body, "request_id": "a1"},
                              headers=A) as a1:
            await client.wait_status(active=1, queued=1, headers=A)  # a1 waits for a0
            async with client.stream("POST", SSE, json={**body, "request_id": "b"},
                                     headers=B) as b:
                assert names(await b.rest())[-1] == "complete"
            for stream in (a0, a1):
                assert names(await stream.rest())[-1] == "complete"
        assert engine.started == ["a0", "b", "a1"]
        assert engine.max_in_use == 2


async def test_rate_limited_with_headers_and_the_other_key_unaffected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(api_keys=f"{KEY_A},{KEY_B}", max_concurrent_requests=2,
                       max_queue_size=8, rate_limit_requests_per_minute=2) as (client, _, _):
        body = {"prompt": "p", "max_tokens": 1}
        first = await client.post(SSE, json=body, headers=A)
        assert first.status == 200
        assert (first.header("x-ratelimit-limit"), first.header("x-ratelimit-remaining"),
                first.header("x-ratelimit-reset")) == ("2", "1", "30")
        assert (await client.post(SSE, json=body, headers=A)).status == 200
        refused = await client.post(SSE, json=body, headers=A)
        assert refused.status == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert refused.header("retry-after") == "30"
        assert (refused.header("x-ratelimit-limit"),
                refused.header("x-ratelimit-remaining")) == ("2", "0")
        assert (await client.post(SSE, json=body, headers=B)).status == 200
        await trio.sleep(30)
        assert (await client.post(SSE, json=body, headers=A)).status == 200


def test_the_socketio_error_carries_the_same_code() -> None:
    error = RateLimited("tokens", 7, RateLimit(limit=100, remaining=0, reset_seconds=60))
    event = error_event(error, "r1").model_dump()
    assert (event["status"], event["code"], event["type"]) == (429, "rate_limited",
                                                               "rate_limit_error")


async def test_token_limit_holds_across_two_replicas_on_one_redis(redis: RedisServer) -> None:
    """Two app instances (two replicas) on one Redis: a key's tokens per minute are
    one budget, whichever replica the requests reach; another key has its own. Real
    clock: Redis is called from worker threads."""
    config = settings(api_keys=f"{KEY_A},{KEY_B}", max_concurrent_requests=2,
                      max_queue_size=8, redis_url=redis.url, redis_prefix="fair-replicas:",
                      # The replicas' shared secret: one key, one owner id on both.
                      owner_id_secret="fairness-replicas-owner-secret-0123456789",
                      rate_limit_tokens_per_minute=100)
    apps = [create_app(config, engine=FakeEngine(config, step_seconds=STEP_S / 100),
                       store=MemorySessionStore()) for _ in range(2)]
    async with serve(apps[0]) as one, serve(apps[1]) as two:
        replicas: list[Client] = [one, two]
        # The fake engine counts a word as a token, plus one: 40 reserved per request
        # (2 prompt tokens + max_tokens 38), all of it generated.
        body = {"prompt": "p", "max_tokens": 38}
        statuses = [(await replicas[i % 2].post(SSE, json=body, headers=A)).status
                    for i in range(3)]
        assert statuses == [200, 200, 429]
        refused = await two.post(SSE, json=body, headers=A)
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.header("x-ratelimit-remaining") or -1) in range(20, 23)
        assert (await one.post(SSE, json=body, headers=B)).status == 200
    for app in apps:
        buckets = app.state.service.rate_limits.buckets
        assert getattr(buckets, "fallbacks", None) == 0


# --- priority classes (keys file, JWT claim) ---

JWT_SECRET = "priority-routes-jwt-secret-0123456789abcdef"
LOW_KEY, HIGH_KEY, PLAIN_KEY = "prio-low", "prio-high", "prio-plain"


def bearer(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


def token(subject: str, **claims: object) -> str:
    payload = {"sub": subject, "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(f"# classes\n{LOW_KEY} priority=low\n{HIGH_KEY}  priority=high\n"
                    f"{PLAIN_KEY}\n")
    return path


def priority_settings(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return {"api_keys": "prio-admin", "api_keys_file": keys_file(tmp_path),
            "jwt_secret": JWT_SECRET, "jwt_priority_claim": "tier",
            "max_concurrent_requests": 1, "max_queue_size": 16,
            "priority_starvation_limit": 2, **overrides}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_classes_from_the_keys_file_and_a_jwt_claim_order_the_queue(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    """One slot. The low key runs one request and queues three; then a high key, a
    JWT whose `tier` claim is `high`, and a key with no class (normal) queue one each.
    The two high requests go first, then (K = 2 high admissions passed) the starved
    classes, the lowest first: l1, then n0, then the low key's rest. Each `queued`
    event's position is the number of requests that ran before it."""
    async with running(**priority_settings(tmp_path)) as (client, engine, _):
        body = {"prompt": "p", "max_tokens": 2}
        senders = [("l0", bearer(LOW_KEY)), ("l1", bearer(LOW_KEY)), ("l2", bearer(LOW_KEY)),
                   ("l3", bearer(LOW_KEY)), ("h0", bearer(HIGH_KEY)),
                   ("j0", bearer(token("jwt-user", tier="high"))), ("n0", bearer(PLAIN_KEY))]
        positions: dict[str, int] = {}
        async with AsyncExitStack() as stack:
            streams = []
            for rid, headers in senders:
                stream = await stack.enter_async_context(client.stream(
                    "POST", SSE, json={**body, "request_id": rid}, headers=headers))
                queued = await stream.next_event(comments=False)
                assert queued is not None and queued.event == "queued"
                positions[rid] = queued.data["position"]
                streams.append(stream)
                if rid == "l0":
                    await client.wait_status(active=1, queued=0, headers=bearer(PLAIN_KEY))
            for stream in streams:
                assert names(await stream.rest())[-1] == "complete"
        order = ["l0", "h0", "j0", "l1", "n0", "l2", "l3"]
        assert engine.started == order
        assert positions == {"l0": 0, "l1": 0, "l2": 1, "l3": 2, "h0": 0, "j0": 1, "n0": 3}
        metrics = samples((await client.get("/metrics", headers=bearer(PLAIN_KEY))).text)
        admitted = {dict(labels)["priority_class"]: value for (name, labels), value
                    in metrics.items() if name == "fabricai_admissions_total"}
        assert admitted == {"high": 2, "normal": 1, "low": 4}


async def test_an_unknown_claim_is_the_default_class_and_refusals_are_counted(
    autojump_clock: trio.testing.MockClock, tmp_path: Path,
) -> None:
    """A JWT whose claim names no class, or is not a string, is the default class
    (normal): it adds no label value. `per_key_limit` and `rate_limited` refusals are
    counted by reason and class; no metric has a `priority_class` outside the three."""
    async with running(**priority_settings(
            tmp_path, max_queued_per_key=1, rate_limit_requests_per_minute=4,
            max_concurrent_requests=2)) as (client, _, _):
        body = {"prompt": "p", "max_tokens": 1}
        for credential in (token("u1", tier="platinum"), token("u2", tier=["high"]),
                           token("u3")):
            assert (await client.post(SSE, json=body, headers=bearer(credential))).status == 200
        # The low key: four requests a minute, the fifth is refused.
        for _ in range(4):
            assert (await client.post(SSE, json=body, headers=bearer(LOW_KEY))).status == 200
        refused = await client.post(SSE, json=body, headers=bearer(LOW_KEY))
        assert refused.json()["error"]["code"] == "rate_limited"
        # The high key: two running, one waiting (its cap); a fourth is refused.
        long_body = {"prompt": "p", "max_tokens": 40}
        async with AsyncExitStack() as stack:
            streams = [await stack.enter_async_context(client.stream(
                "POST", SSE, json=long_body, headers=bearer(HIGH_KEY))) for _ in range(3)]
            await client.wait_status(active=2, queued=1, headers=bearer(PLAIN_KEY))
            over = await client.post(SSE, json=long_body, headers=bearer(HIGH_KEY))
            assert over.json()["error"]["code"] == "per_key_limit"
            metrics = samples((await client.get("/metrics", headers=bearer(PLAIN_KEY))).text)
            depth = {dict(labels)["priority_class"]: value for (name, labels), value
                     in metrics.items() if name == "fabricai_queue_depth_by_class"}
            assert depth == {"high": 1, "normal": 0, "low": 0}
            for stream in streams:
                assert names(await stream.rest())[-1] == "complete"
        metrics = samples((await client.get("/metrics", headers=bearer(PLAIN_KEY))).text)
        classes = {dict(labels).get("priority_class") for (_, labels) in metrics} - {None}
        assert classes == {"high", "normal", "low"}
        refusals = {(dict(labels)["reason"], dict(labels)["priority_class"]): value
                    for (name, labels), value in metrics.items()
                    if name == "fabricai_refusals_total" and value}
        assert refusals == {("rate_limited", "low"): 1, ("per_key_limit", "high"): 1}
        for histogram in ("fabricai_time_to_first_token_seconds_count",
                          "fabricai_queue_wait_seconds_count"):
            counts = {dict(labels)["priority_class"]: value for (name, labels), value
                      in metrics.items() if name == histogram}
            assert counts == {"high": 3, "normal": 3, "low": 4}, histogram
