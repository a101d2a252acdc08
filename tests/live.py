"""Helpers for tests against a live server: idle polling and /metrics parsing."""

from __future__ import annotations

import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def status(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/v1/status")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def wait_for(client: httpx.Client, *, active: int, queued: int, timeout: float = 60.0) -> None:
    """Poll /v1/status until it shows `active` running and `queued` waiting (`timeout`:
    a hang guard, not a budget)."""
    deadline = time.monotonic() + timeout
    while True:
        concurrency = status(client)["concurrency"]
        if concurrency["active"] == active and concurrency["queued"] == queued:
            return
        assert time.monotonic() < deadline, f"status stuck at {concurrency}"
        time.sleep(0.02)


def wait_idle(client: httpx.Client, timeout: float = 60.0) -> None:
    wait_for(client, active=0, queued=0, timeout=timeout)


def ended_normally(reason: str | None, tokens: int, max_tokens: int) -> bool:
    """How a generation of up to `max_tokens` may end when the test does not pin the
    model's output: with all of them (`length`), or earlier because the model ended its
    text (`stop`). Where that happens can differ between CPUs: AVX2 and AVX-512 kernels
    round differently, and greedy decoding flips at near ties."""
    return (reason, tokens) == ("length", max_tokens) or (
        reason == "stop" and 0 <= tokens <= max_tokens
    )


def scrape(client: httpx.Client) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (so a test
    that names no `model` counts every model's); 0 when there is none."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)
