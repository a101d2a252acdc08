"""Rate limits per principal: the token bucket in memory (MockClock) and in Redis (a
private redis-server): the same rule, atomic across two replicas, failing open to
per-replica limits when Redis is down."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from fabricai_trio.core.errors import RateLimited, http_error
from fabricai_trio.rate_limit import (
    Buckets,
    MemoryBuckets,
    RateLimits,
    RedisBuckets,
    Spend,
)

from ..redis_server import RedisServer, find_free_port


async def test_requests_per_minute_burst_then_refill(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = RateLimits(requests_per_minute=3)
    for expected_remaining in (2, 1, 0):
        reservation = await limits.take("a", tokens=10)
        assert reservation is not None
        assert reservation.states[0].remaining == expected_remaining
    with pytest.raises(RateLimited) as refused:
        await limits.take("a", tokens=10)
    error = refused.value
    assert (error.code, error.which, error.retry_after) == ("rate_limited", "requests", 20)
    rendered = http_error(error)
    assert rendered.status == 429
    assert rendered.headers == {
        "Retry-After": "20", "X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "60",
    }
    # Another principal has its own bucket.
    assert await limits.take("b", tokens=10) is not None
    await trio.sleep(20)  # one request refilled
    assert await limits.take("a", tokens=10) is not None
    with pytest.raises(RateLimited):
        await limits.take("a", tokens=10)


async def test_tokens_are_reserved_and_the_unused_given_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = RateLimits(tokens_per_minute=1000)
    first = await limits.take("a", tokens=600)
    assert first is not None and first.states[0].remaining == 400
    with pytest.raises(RateLimited) as refused:
        await limits.take("a", tokens=600)
    assert refused.value.which == "tokens"
    assert refused.value.retry_after == 12  # 200 tokens at 1000/60 per second
    await limits.give_back(first, tokens=500)  # it generated 100 of 500 reserved
    await limits.give_back(first, tokens=500)  # idempotent
    second = await limits.take("a", tokens=600)
    assert second is not None and second.states[0].remaining == 300


async def test_a_request_larger_than_the_bucket_passes_when_it_is_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = RateLimits(tokens_per_minute=100)
    assert await limits.take("a", tokens=250) is not None  # leaves it 150 in debt
    with pytest.raises(RateLimited) as refused:
        await limits.take("a", tokens=1)
    assert refused.value.retry_after == 91  # (1 + 150) tokens at 100/60 per second


async def test_both_limits_take_both_or_neither(autojump_clock: trio.testing.MockClock) -> None:
    limits = RateLimits(requests_per_minute=10, tokens_per_minute=100)
    assert await limits.take("a", tokens=90) is not None
    with pytest.raises(RateLimited) as refused:
        await limits.take("a", tokens=50)
    assert refused.value.which == "tokens"
    # The refused request took no request either: 9 left.
    reservation = await limits.take("a", tokens=10)
    assert reservation is not None
    assert [s.remaining for s in reservation.states] == [8, 0]


async def test_no_limits_store_nothing() -> None:
    buckets = MemoryBuckets()
    limits = RateLimits(buckets=buckets)
    assert await limits.take("a", tokens=10**9) is None
    assert not buckets._levels


async def contract(buckets: Buckets, other: Buckets, principal: str) -> None:
    """The bucket rule, checked through `buckets` and a second client `other` on the
    same store: a replica's spend is seen by the other."""
    spend = [Spend("requests", 60, 1)]  # one per second
    taken = 0
    for store in [buckets, other] * 30:
        outcome = await store.spend(principal, spend)
        if outcome.allowed:
            taken += 1
        else:
            assert outcome.wait_seconds > 0
    # 60 available between the two, a little refill while the calls ran.
    assert 60 <= taken <= 62
    refused = await other.spend(principal, spend)
    assert not refused.allowed and 0 < refused.wait_seconds <= 1
    # Giving back never goes above the capacity.
    back = await buckets.spend(principal, [Spend("requests", 60, -1000)])
    assert back.allowed and back.levels == (60.0,)


async def test_memory_buckets_follow_the_rule() -> None:
    buckets = MemoryBuckets()
    await contract(buckets, buckets, "p")


async def test_redis_buckets_hold_across_two_replicas(redis: RedisServer) -> None:
    """Two clients (two replicas' limiters) on one Redis share each principal's bucket:
    together they take what one limit allows, not twice that."""
    a = RedisBuckets(redis.url, prefix="rl-test:")
    b = RedisBuckets(redis.url, prefix="rl-test:")
    try:
        await contract(a, b, "key:shared")
        assert a.fallbacks == b.fallbacks == 0
        limits_a = RateLimits(tokens_per_minute=1000, buckets=a)
        limits_b = RateLimits(tokens_per_minute=1000, buckets=b)
        first = await limits_a.take("key:t", tokens=700)
        assert first is not None
        with pytest.raises(RateLimited) as refused:
            await limits_b.take("key:t", tokens=700)
        assert refused.value.state.remaining in (300, 301)
        await limits_a.give_back(first, tokens=600)
        assert await limits_b.take("key:t", tokens=700) is not None
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_down_fails_open_to_this_replicas_limits() -> None:
    """No Redis at the URL: every call is answered by the replica's own buckets, so
    requests still go through and the limit still holds on this replica."""
    buckets = RedisBuckets(f"redis://127.0.0.1:{find_free_port()}/0", prefix="x:",
                           timeout_seconds=0.5)
    try:
        limits = RateLimits(requests_per_minute=2, buckets=buckets)
        assert await limits.take("a", tokens=1) is not None
        assert await limits.take("a", tokens=1) is not None
        with pytest.raises(RateLimited):
            await limits.take("a", tokens=1)
        assert buckets.fallbacks == 3
    finally:
        await buckets.aclose()


async def test_a_paused_redis_costs_one_timeout_then_falls_back(
    redis: RedisServer,
) -> None:
    buckets = RedisBuckets(redis.url, prefix="paused:", timeout_seconds=0.3)
    limits = RateLimits(requests_per_minute=5, buckets=buckets)
    try:
        assert await limits.take("a", tokens=1) is not None
        redis.pause()
        try:
            assert await limits.take("a", tokens=1) is not None
            assert buckets.fallbacks == 1
        finally:
            redis.resume()
        assert await limits.take("a", tokens=1) is not None
        assert buckets.fallbacks == 1
    finally:
        await buckets.aclose()
