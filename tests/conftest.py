"""Shared fixtures: the embedded model and real server processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabricai_trio.engine.model_files import embedded_model_path
from fabricai_trio.settings import Settings

from .redis_server import RedisServer, redis_server_binary
from .server_process import ServerProcess, model_env

# The tests start many real-model servers, and most make no constrained request: they
# build llguidance's tokenizer only when one does (CONSTRAINT_WARMUP=false), unless the
# suite is run with CONSTRAINT_WARMUP set. Servers started by the tests inherit this;
# tests/test_constraint_warmup.py turns it on where it is the subject.
os.environ.setdefault("CONSTRAINT_WARMUP", "false")

# One decode thread for every engine the tests start (servers inherit it; in-process
# Settings read it), unless the suite is run with N_THREADS set. The default, one per
# CPU, crawls on a 2-core CI machine: the test process and its clients share the cores,
# and ggml's spinning thread barriers stall when a decode thread is descheduled
# (tests/test_sse_real.py with tests/sessions/test_postgres_pause.py: 116 s with two
# threads, 55 s with one). Thread count changes no behaviour under test; the tests that
# set n_threads themselves keep theirs.
os.environ.setdefault("N_THREADS", "1")


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The embedded Gemma model, assembled once into the default cache dir."""
    return embedded_model_path(Settings().model_cache_dir)


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


def serve_real_model(model_path: Path, server_logs: Path, **settings: str
                     ) -> Iterator[ServerProcess]:
    """A real server on the real model: 2 slots, a queue of 2."""
    env = model_env(
        model_path,
        MAX_CONCURRENT_REQUESTS="2",
        MAX_QUEUE_SIZE="2",
        MAX_TOKENS_LIMIT="512",
        MAX_BODY_BYTES="4096",
        SSE_KEEPALIVE_SECONDS="0.2",
        **settings,
    )
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


@pytest.fixture(scope="module")
def server(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    """A real server on the real model, default engine: 2 slots, a queue of 2."""
    yield from serve_real_model(model_path, server_logs)


@pytest.fixture(scope="session", params=["batched", "llama"])
def each_engine_server(request: pytest.FixtureRequest, model_path: Path, server_logs: Path
                       ) -> Iterator[ServerProcess]:
    """The same, once per built-in engine (ENGINE=batched, the default, and the pool).

    One pair for the whole session: the modules that use it (sampling, logprobs, SSE,
    structured output) leave no state a test reads (they wait until idle and compare
    counters before and after), and pytest runs all the tests of one engine together,
    so two servers start instead of two per module."""
    yield from serve_real_model(model_path, server_logs, ENGINE=request.param)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    """A private redis-server on a free port (never 6379), for one test module."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer() as server:
        yield server
