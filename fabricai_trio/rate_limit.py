"""Rate limits per principal: requests and tokens per minute, as token buckets.

A bucket holds up to `limit` (its per-minute figure: a burst may spend all of it at
once) and refills at `limit / 60` per second. A request takes one from the `requests`
bucket and `prompt + max_tokens` from the `tokens` bucket, both or neither; what it did
not generate is given back when it ends (`RateLimits.settle`). A request that costs
more than a whole bucket is let through when the bucket is full, which leaves it in
debt: no limit can refuse a request for ever.

Where the buckets live:

* `MemoryBuckets`: in this process (no REDIS_URL): each replica has its own.
* `RedisBuckets`: in Redis, one hash per (principal, bucket), updated by one Lua
  script (EVALSHA) that refills and takes atomically with Redis's own clock, so the
  limits hold across every replica that shares the Redis. redis-py runs in worker
  threads behind a dedicated `CapacityLimiter`, with socket timeouts.

Redis down: **fail open to per-replica limits**. A call that fails or times out is
answered by this replica's `MemoryBuckets` (logged, counted in `fallbacks`), so an
outage neither takes the server down with it (fail closed would refuse everything)
nor removes every limit (each replica still enforces them for the traffic it sees).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
import trio

from .core.errors import RateLimit, RateLimited

log = logging.getLogger(__name__)

REQUESTS = "requests"
TOKENS = "tokens"


@dataclass(frozen=True, slots=True)
class Spend:
    """What one call does to one bucket: `cost` taken (negative: given back)."""

    bucket: str
    limit: int  # per minute; also the capacity
    cost: float

    @property
    def rate(self) -> float:
        """Refill per second."""
        return self.limit / 60.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """`allowed`, the wait until it would be (0 if allowed), and each bucket's level
    after the call (in the order of the spends)."""

    allowed: bool
    wait_seconds: float
    levels: tuple[float, ...]


def refill(level: float, since: float, now: float, spend: Spend) -> float:
    """The level of a bucket last seen at `level` at time `since`."""
    return min(float(spend.limit), level + max(0.0, now - since) * spend.rate)


def apply(levels: Sequence[float], spends: Sequence[Spend]) -> Outcome:
    """Take every spend or none (the levels are already refilled). The same rule as
    the Lua script below: a cost is allowed if the level covers it, or covers a full
    bucket for a cost larger than the bucket."""
    wait = 0.0
    for level, spend in zip(levels, spends, strict=True):
        need = min(spend.cost, float(spend.limit))
        if spend.cost > 0 and level < need:
            wait = max(wait, (need - level) / spend.rate)
    if wait > 0:
        return Outcome(False, wait, tuple(levels))
    after = tuple(
        min(float(spend.limit), level - spend.cost)
        for level, spend in zip(levels, spends, strict=True)
    )
    return Outcome(True, 0.0, after)


class Buckets(Protocol):
    """Where the buckets are kept."""

    async def spend(self, principal: str, spends: Sequence[Spend]) -> Outcome:
        """Refill, then take every spend or none, atomically for this principal.

        Cancellation: the call may have been applied or not."""


class MemoryBuckets:
    """Buckets in this process; the clock is trio's (a `MockClock` in tests)."""

    #: Entries kept before full buckets are forgotten (a full bucket = no entry).
    PRUNE_ABOVE = 10_000

    def __init__(self) -> None:
        self._levels: dict[tuple[str, str], tuple[float, float]] = {}  # -> (level, at)

    async def spend(self, principal: str, spends: Sequence[Spend]) -> Outcome:
        """Never blocks; a checkpoint."""
        await trio.lowlevel.checkpoint()
        return self.spend_now(principal, spends)

    def spend_now(self, principal: str, spends: Sequence[Spend]) -> Outcome:
        now = trio.current_time()
        levels = []
        for spend in spends:
            level, at = self._levels.get((principal, spend.bucket), (float(spend.limit), now))
            levels.append(refill(level, at, now, spend))
        outcome = apply(levels, spends)
        for level, spend in zip(outcome.levels, spends, strict=True):
            self._levels[(principal, spend.bucket)] = (level, now)
        if len(self._levels) > self.PRUNE_ABOVE:
            self._prune(now, {s.bucket: s for s in spends})
        return outcome

    def _prune(self, now: float, by_bucket: dict[str, Spend]) -> None:
        for key, (level, at) in list(self._levels.items()):
            spend = by_bucket.get(key[1])
            if spend is None or refill(level, at, now, spend) >= spend.limit:
                del self._levels[key]


#: KEYS: one hash per bucket. ARGV: (limit, refill per second, cost) per bucket.
#: Returns {allowed (0/1), wait seconds, level after of each bucket} as strings.
SPEND_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS
local levels = {}
local wait = 0
for i = 1, n do
  local cap = tonumber(ARGV[3 * i - 2])
  local rate = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local stored = redis.call('HMGET', KEYS[i], 'level', 'at')
  local level = tonumber(stored[1])
  local at = tonumber(stored[2])
  if level == nil or at == nil then
    level = cap
    at = now
  end
  level = math.min(cap, level + math.max(0, now - at) * rate)
  levels[i] = level
  local need = math.min(cost, cap)
  if cost > 0 and level < need then
    wait = math.max(wait, (need - level) / rate)
  end
end
local allowed = 0
if wait == 0 then allowed = 1 end
local out = {allowed, tostring(wait)}
for i = 1, n do
  local cap = tonumber(ARGV[3 * i - 2])
  local rate = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local level = levels[i]
  if allowed == 1 then
    level = math.min(cap, level - cost)
  end
  redis.call('HSET', KEYS[i], 'level', tostring(level), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((cap - level) / rate * 1000) + 1000)
  out[#out + 1] = tostring(level)
end
return out
"""


class RedisBuckets:
    """Buckets in Redis, shared by every replica; falls back to `MemoryBuckets` (this
    replica's) while Redis fails."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        timeout_seconds: float = 2.0,
        max_threads: int = 4,
        fallback: MemoryBuckets | None = None,
    ) -> None:
        self._client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds,
            max_connections=max_threads,
        )
        self._script: Any = self._client.register_script(SPEND_SCRIPT)
        self._prefix = prefix
        self._timeout = timeout_seconds
        self._limiter = trio.CapacityLimiter(max_threads)
        self.fallback = fallback or MemoryBuckets()
        #: Calls answered by the fallback because Redis failed.
        self.fallbacks = 0

    def key(self, principal: str, bucket: str) -> str:
        # One hash tag per principal: a principal's buckets share a cluster slot.
        return f"{self._prefix}ratelimit:{{{principal}}}:{bucket}"

    async def spend(self, principal: str, spends: Sequence[Spend]) -> Outcome:
        """One script call, bounded by the timeout; the fallback's answer if Redis
        fails. Cancellation waits for the call in its thread (bounded by the socket
        timeout), then raises."""
        keys = [self.key(principal, s.bucket) for s in spends]
        args: list[float | int] = []
        for s in spends:
            args += [s.limit, s.rate, s.cost]
        try:
            with trio.fail_after(self._timeout):
                raw = await trio.to_thread.run_sync(
                    lambda: self._script(keys=keys, args=args), limiter=self._limiter
                )
            return Outcome(
                allowed=int(raw[0]) == 1,
                wait_seconds=float(raw[1]),
                levels=tuple(float(v) for v in raw[2:]),
            )
        except (redis.RedisError, trio.TooSlowError) as exc:
            self.fallbacks += 1
            log.warning("rate limits: Redis failed (%s): this replica's own limits apply", exc)
            return self.fallback.spend_now(principal, spends)

    async def aclose(self) -> None:
        """Close the connection pool (in a thread). Cancellation waits for it."""
        await trio.to_thread.run_sync(self._client.close, limiter=self._limiter)


@dataclass(slots=True)
class Reservation:
    """What a request took: given back in part by `RateLimits.settle()`."""

    principal: str
    tokens: int
    states: tuple[RateLimit, ...] = field(default=())
    settled: bool = False


class RateLimits:
    """The configured limits over a `Buckets`; both limits 0: everything allowed,
    nothing stored."""

    def __init__(
        self, *, requests_per_minute: int = 0, tokens_per_minute: int = 0,
        buckets: Buckets | None = None,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.buckets: Buckets = buckets if buckets is not None else MemoryBuckets()

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def _spends(self, *, requests: float, tokens: float) -> list[Spend]:
        spends = []
        if self.requests_per_minute:
            spends.append(Spend(REQUESTS, self.requests_per_minute, requests))
        if self.tokens_per_minute:
            spends.append(Spend(TOKENS, self.tokens_per_minute, tokens))
        return spends

    async def take(self, principal: str, *, tokens: int) -> Reservation | None:
        """Take one request and `tokens` (prompt + max_tokens) for `principal`, or
        raise `RateLimited` (taking nothing). None when no limit is set.

        Cancellation: the spend may have been applied or not (it is never refunded)."""
        if not self.enabled:
            return None
        spends = self._spends(requests=1, tokens=tokens)
        outcome = await self.buckets.spend(principal, spends)
        states = tuple(_state(level, s) for level, s in zip(outcome.levels, spends, strict=True))
        if not outcome.allowed:
            # Name the limit that needs the longest wait.
            waits = [
                (min(s.cost, s.limit) - level) / s.rate
                for level, s in zip(outcome.levels, spends, strict=True)
            ]
            worst = max(range(len(spends)), key=lambda i: waits[i])
            raise RateLimited(
                spends[worst].bucket, max(1, math.ceil(outcome.wait_seconds)), states[worst]
            )
        return Reservation(principal=principal, tokens=tokens, states=states)

    async def give_back(self, reservation: Reservation, *, tokens: int) -> None:
        """Return `tokens` of a reservation (those it did not use). Idempotent per
        reservation; a no-op without a tokens limit. Cancellation: given back or not."""
        if reservation.settled:
            return
        reservation.settled = True
        if not self.tokens_per_minute or tokens <= 0:
            return
        spends = [Spend(TOKENS, self.tokens_per_minute, -min(tokens, reservation.tokens))]
        await self.buckets.spend(reservation.principal, spends)


def _state(level: float, spend: Spend) -> RateLimit:
    return RateLimit(
        limit=spend.limit,
        remaining=max(0, math.floor(level)),
        reset_seconds=math.ceil(max(0.0, spend.limit - level) / spend.rate),
    )
