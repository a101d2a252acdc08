"""Per-turn session store overhead: what a generation pays the store, per backend.

One "turn" is what the server does around a generation on a session: try_lock, get
(the history), append_turn (user + assistant message), unlock. Each session takes
`--turns-per-session` turns (history grows to twice that many messages), then a new one
starts. Redis runs on a private redis-server (tests/redis_server.py), SQLite on a file
in a temp dir, PostgreSQL (with --postgres) on a private cluster.

    .venv/bin/python bench/store_overhead.py [--turns 500] [--postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fabricai_trio.sessions import MemorySessionStore, Message, SessionStore  # noqa: E402


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(store: SessionStore, turns: int, per_session: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {"get": [], "append": [], "lock": [], "turn": []}
    sid = ""
    for i in range(turns + 20):  # the first 20 warm up connections and caches
        if i % per_session == 0:
            sid = (await store.create("bench", system_prompt="You are a helpful bot.")).id
        token = uuid.uuid4().hex
        user = Message(role="user", content="What is the capital of France? " * 4)
        reply = Message(role="assistant", content="Paris. " * 30, finish_reason="stop")
        t0 = time.perf_counter()
        assert await store.try_lock(sid, token, 60)
        t1 = time.perf_counter()
        session = await store.get(sid)
        assert session is not None
        t2 = time.perf_counter()
        await store.append_turn(sid, [user, reply])
        t3 = time.perf_counter()
        await store.unlock(sid, token)
        t4 = time.perf_counter()
        if i >= 20:
            timings["lock"].append((t1 - t0) + (t4 - t3))
            timings["get"].append(t2 - t1)
            timings["append"].append(t3 - t2)
            timings["turn"].append(t4 - t0)
    return timings


@contextlib.contextmanager
def backends(postgres: bool) -> Iterator[list[tuple[str, Callable[[], SessionStore]]]]:
    from fabricai_trio.sessions.redis_store import RedisSessionStore
    from fabricai_trio.sessions.sql import SqlSessionStore
    from tests.redis_server import RedisServer

    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        chosen: list[tuple[str, Callable[[], SessionStore]]] = [
            ("memory", MemorySessionStore),
            ("redis", lambda: RedisSessionStore(redis.url, prefix="bench:")),
            ("sqlite", lambda: SqlSessionStore(f"sqlite:///{tmp / 'bench.db'}")),
            ("sqlite :memory:", lambda: SqlSessionStore("sqlite://")),
        ]
        if postgres:
            from tests.postgres_server import PostgresServer

            pg = stack.enter_context(PostgresServer())
            chosen.append(("postgres", lambda: SqlSessionStore(pg.url)))
        yield chosen


async def run(turns: int, per_session: int, postgres: bool) -> None:
    header = (
        f"{'backend':<16} {'turn p50':>9} {'turn p99':>9} {'get p50':>8} "
        f"{'append p50':>10} {'lock+unlock p50':>15}   (milliseconds)"
    )
    print(f"{turns} turns, {per_session} per session (history up to {2 * per_session} msgs)")
    print(header)
    print("-" * len(header))
    with backends(postgres) as chosen:
        for name, make in chosen:
            store = make()
            try:
                t = await measure(store, turns, per_session)
            finally:
                await store.aclose()
            ms = {k: [1000 * v for v in vs] for k, vs in t.items()}
            print(
                f"{name:<16} {statistics.median(ms['turn']):>9.3f} "
                f"{percentile(ms['turn'], 0.99):>9.3f} {statistics.median(ms['get']):>8.3f} "
                f"{statistics.median(ms['append']):>10.3f} {statistics.median(ms['lock']):>15.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--turns-per-session", type=int, default=10)
    parser.add_argument("--postgres", action="store_true", help="also a private PostgreSQL")
    args = parser.parse_args()
    trio.run(run, args.turns, args.turns_per_session, args.postgres)


if __name__ == "__main__":
    main()
