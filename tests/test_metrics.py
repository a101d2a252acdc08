"""/metrics on a real server: the values move as they should across a stream, a 429 and
a cancellation (parsed with prometheus_client's parser)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from fabricai_trio.app import create_app
from fabricai_trio.sessions import MemorySessionStore, SessionInfo, StoreUnavailable
from fabricai_trio.settings import Settings

from .fakes import FakeEngine
from .live import Samples, ended_normally, scrape, value, wait_for, wait_idle
from .server_process import ServerProcess, model_env
from .sse_client import parse_lines

LONG = {"prompt": "Once upon a time", "max_tokens": 512, "temperature": 0}


@pytest.fixture(scope="module")
def server(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    env = model_env(
        model_path,
        MAX_CONCURRENT_REQUESTS="1",
        MAX_QUEUE_SIZE="1",
        MAX_TOKENS_LIMIT="512",
    )
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.mark.model
def test_a_stream_moves_tokens_latency_and_requests(http: httpx.Client) -> None:
    wait_idle(http)
    before = scrape(http)
    response = http.post("/v1/inference_sse", json={**LONG, "max_tokens": 8})
    complete = list(parse_lines(iter(response.text.splitlines())))[-1].data
    after = scrape(http)
    generated = complete["usage"]["completion_tokens"]
    assert ended_normally(complete["finish_reason"], generated, 8)
    assert delta(before, after, "fabricai_generation_tokens_total") == generated
    assert delta(before, after, "fabricai_prompt_tokens_total") == (
        complete["usage"]["prompt_tokens"]
    )
    assert delta(before, after, "fabricai_generations_total",
                 finish_reason=complete["finish_reason"]) == 1
    assert delta(before, after, "fabricai_time_to_first_token_seconds_count") == 1
    ttft = delta(before, after, "fabricai_time_to_first_token_seconds_sum")
    assert 0 < ttft <= complete["timings"]["total_ms"] / 1000
    # One latency sample per token after the first (the last, empty chunk carries none).
    assert delta(before, after, "fabricai_time_per_output_token_seconds_count") == generated - 1
    # The request is counted when its ASGI call returns, just after the client has read
    # the last event: a scrape sent at once may come first (on a busy machine it does).
    deadline = time.monotonic() + 30  # a hang guard
    while (counted := delta(before, scrape(http), "fabricai_http_requests_total",
                            route="/v1/inference_sse", method="POST", status="200")) == 0:
        assert time.monotonic() < deadline, "the SSE request was never counted"
        time.sleep(0.02)
    assert counted == 1
    assert value(after, "fabricai_active_generations") == 0
    assert value(after, "fabricai_queue_depth") == 0
    assert value(after, "fabricai_queue_capacity") == 1
    assert value(after, "fabricai_max_concurrent_generations") == 1
    # The scrape itself was counted by the time of the next one.
    assert value(scrape(http), "fabricai_http_requests_total",
                 route="/metrics", method="GET", status="200") >= 2


@pytest.mark.model
def test_gauges_429_and_cancellations(http: httpx.Client, server: ServerProcess) -> None:
    wait_idle(http)
    before = scrape(http)
    with httpx.Client(base_url=server.url, timeout=60) as holders, \
            holders.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # decoding has begun once the first chunk is here
        assert next(line for line in lines if line.startswith("data: "))
        wait_for(http, active=1, queued=0)
        with holders.stream("POST", "/v1/inference_sse", json=LONG) as queued:
            assert queued.status_code == 200
            wait_for(http, active=1, queued=1)
            during = scrape(http)
            assert value(during, "fabricai_active_generations") == 1
            assert value(during, "fabricai_queue_depth") == 1
            # The running stream holds KV cells: its prompt and what it decoded so far.
            assert 0 < value(during, "fabricai_kv_cache_usage_ratio") <= 1
            rejected = http.post("/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "hi"}]})
            assert rejected.status_code == 429
    # Both streams closed: the running one cancelled mid-decode, the queued one in line.
    wait_idle(http)
    after = scrape(http)
    assert delta(before, after, "fabricai_queue_rejections_total") == 1
    assert delta(before, after, "fabricai_http_requests_total",
                 route="/v1/chat/completions", method="POST", status="429") == 1
    assert delta(before, after, "fabricai_cancellations_total", cause="disconnect") == 2
    assert delta(before, after, "fabricai_cancellations_total", cause="cancel") == 0
    assert delta(before, after, "fabricai_generations_total", finish_reason="cancelled") == 2
    generated = delta(before, after, "fabricai_generation_tokens_total")
    assert 0 < generated < 512
    # Only the running request was admitted, so only its prompt counts.
    prompt = delta(before, after, "fabricai_prompt_tokens_total")
    assert 0 < prompt < 20
    assert value(after, "fabricai_active_generations") == 0
    assert value(after, "fabricai_queue_depth") == 0
    # Its cells are freed or parked in the prefix cache: no more in use than while it ran.
    assert value(after, "fabricai_kv_cache_usage_ratio") <= value(
        during, "fabricai_kv_cache_usage_ratio")


@pytest.mark.model
def test_known_label_values_start_at_zero(http: httpx.Client) -> None:
    samples = scrape(http)
    for cause in ("disconnect", "cancel", "shutdown", "slow_client"):
        assert ("fabricai_cancellations_total", frozenset({("cause", cause)})) in samples
    for kind in ("unavailable", "timeout", "write_failed"):
        assert value(samples, "fabricai_session_store_errors_total", kind=kind) == 0
        assert ("fabricai_session_store_errors_total", frozenset({("kind", kind)})) in samples


class DownStore(MemorySessionStore):
    """A store that is down: every listing fails as Redis would when unreachable."""

    async def list_sessions(self, owner: str) -> list[SessionInfo]:
        await trio.lowlevel.checkpoint()
        raise StoreUnavailable("down")


async def test_session_store_errors_are_counted() -> None:
    config = Settings(session_store="memory")
    app = create_app(config, engine=FakeEngine(config), store=DownStore())
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        assert (await client.get("/v1/sessions")).status_code == 503
        assert (await client.get("/v1/sessions")).status_code == 503
        text = (await client.get("/metrics")).text
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }
    assert value(samples, "fabricai_session_store_errors_total", kind="unavailable") == 2
    assert value(samples, "fabricai_http_requests_total",
                 route="/v1/sessions", method="GET", status="503") == 2
