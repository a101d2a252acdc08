"""Priority classes on the real model, over a real socket (httpx).

One slot, so requests run one at a time in the order they are admitted. A key's class
comes from the API keys file (`priority=<class>`) or a JWT's `tier` claim
(JWT_PRIORITY_CLAIM); a high-class request that queues after a low one is admitted
before it (over HTTP and Socket.IO), and /metrics counts admissions, waits and TTFT
per class, with no `priority_class` outside PRIORITY_CLASSES. The exact order under a
flood and the starvation bound are checked in virtual time
(tests/unit/test_admission.py, tests/test_fairness_routes.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import socketio
import trio
from prometheus_client.parser import text_string_to_metric_families

from .server_process import ServerProcess, model_env
from .sse_client import aparse

pytestmark = pytest.mark.model

LOW, LOW2, HIGH = "real-prio-low", "real-prio-low-2", "real-prio-high"
PLAIN = "real-prio-plain"
SECRET = "real-priority-jwt-secret-0123456789abcdef"
#: Long enough to hold the slot while the others queue (it is cancelled after).
HOLD = {"prompt": "Tell me a long story about a dragon.", "max_tokens": 400,
        "temperature": 0}
SHORT = {"prompt": "Count: one, two,", "max_tokens": 2, "temperature": 0}


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def token(subject: str, **claims: Any) -> str:
    payload = {"sub": subject, "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def priority_server(model_path: Path, server_logs: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    keys = tmp_path_factory.mktemp("priority") / "keys"
    keys.write_text(f"{LOW} priority=low\n{LOW2} priority=low\n{HIGH} priority=high\n"
                    f"{PLAIN}\n")
    env = model_env(
        model_path,
        API_KEYS_FILE=str(keys),
        JWT_SECRET=SECRET,
        JWT_PRIORITY_CLAIM="tier",
        MAX_CONCURRENT_REQUESTS="1",
        MAX_QUEUE_SIZE="8",
        MAX_TOKENS_LIMIT="512",
    )
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


async def concurrency(client: httpx.AsyncClient) -> tuple[int, int]:
    data = (await client.get("/v1/status", headers=bearer(PLAIN))).json()["concurrency"]
    return data["active"], data["queued"]


async def wait_for(client: httpx.AsyncClient, active: int, queued: int) -> None:
    with trio.fail_after(120):  # a hang guard
        while await concurrency(client) != (active, queued):
            await trio.sleep(0.02)


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = (await client.get("/metrics", headers=bearer(PLAIN))).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def by_class(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str
             ) -> dict[str, float]:
    return {dict(labels)["priority_class"]: value
            for (sample, labels), value in metrics.items() if sample == name}


async def queued_pair(client: httpx.AsyncClient, early: str, late: str, *,
                      late_over_socketio: bool = False) -> tuple[list[str], dict[str, int]]:
    """The low key's long request holds the slot (it has streamed a token); a request
    with the `early` credential queues, then one with the `late` credential (over
    Socket.IO, its CONNECT `auth`, if `late_over_socketio`); then the holder leaves.
    Returns the order in which the two completed (one slot: the order they were
    admitted in) and the positions their `queued` events said."""
    completed: list[str] = []
    positions: dict[str, int] = {}

    async def send_socketio(name: str, api_key: str, *,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
        sio = socketio.Client(reconnection=False)
        queued, done = threading.Event(), threading.Event()

        def on_queued(data: dict[str, Any]) -> None:
            positions[name] = data["position"]
            queued.set()

        sio.on("inference_queued", on_queued)
        sio.on("inference_complete", lambda data: done.set())
        await trio.to_thread.run_sync(lambda: sio.connect(
            str(client.base_url), auth={"apiKey": api_key}, transports=["websocket"],
            wait_timeout=10))
        try:
            sio.emit("inference_prompt", {**SHORT, "request_id": f"sio-{name}"})
            assert await trio.to_thread.run_sync(queued.wait, 60)
            task_status.started()
            assert await trio.to_thread.run_sync(done.wait, 120)
            completed.append(name)
        finally:
            await trio.to_thread.run_sync(sio.disconnect)

    async def send(name: str, credential: str, *,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with client.stream("POST", "/v1/inference_sse", json=SHORT,
                                 headers=bearer(credential)) as response:
            assert response.status_code == 200, await response.aread()
            async for event in aparse(response.aiter_lines()):
                if event.event == "queued":
                    positions[name] = event.data["position"]
                    task_status.started()
                elif event.event == "complete":
                    completed.append(name)
                    return

    hold_scope = trio.CancelScope()

    async def hold(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with hold_scope:
            async with client.stream("POST", "/v1/inference_sse", json=HOLD,
                                     headers=bearer(LOW)) as response:
                assert response.status_code == 200
                started = False
                async for event in aparse(response.aiter_lines()):
                    if event.event == "token" and not started:
                        started = True
                        task_status.started()
                raise AssertionError("the holder ended before the others queued")

    await wait_for(client, 0, 0)
    async with trio.open_nursery() as nursery:
        await nursery.start(hold)
        await nursery.start(send, "early", early)
        await nursery.start(send_socketio if late_over_socketio else send, "late", late)
        assert await concurrency(client) == (1, 2)  # both wait behind the holder
        hold_scope.cancel()
    return completed, positions


async def test_a_high_key_from_the_keys_file_is_admitted_before_an_earlier_low_one(
    priority_server: ServerProcess,
) -> None:
    async with httpx.AsyncClient(base_url=priority_server.url, timeout=120) as client:
        before = await scrape(client)
        # Another low key than the holder's: fair sharing alone would serve it first.
        completed, positions = await queued_pair(client, early=LOW2, late=HIGH)
        after = await scrape(client)
    assert completed == ["late", "early"]
    assert positions == {"early": 0, "late": 0}  # the high one went before the low one
    admitted_before = by_class(before, "fabricai_admissions_total")
    admitted = by_class(after, "fabricai_admissions_total")
    assert {name: admitted[name] - admitted_before[name] for name in admitted} == {
        "high": 1, "normal": 0, "low": 2}


async def test_a_jwt_claim_names_the_class_and_an_unknown_one_is_the_default(
    priority_server: ServerProcess,
) -> None:
    """`tier: high` goes before `tier: platinum` (no such class: `normal`), which
    queued first; the metrics count one admission, wait and TTFT in each class."""
    async with httpx.AsyncClient(base_url=priority_server.url, timeout=120) as client:
        before = await scrape(client)
        completed, _ = await queued_pair(client, early=token("sub-early", tier="platinum"),
                                         late=token("sub-late", tier="high"))
        after = await scrape(client)
    assert completed == ["late", "early"]
    for name in ("fabricai_admissions_total", "fabricai_queue_wait_seconds_count",
                 "fabricai_time_to_first_token_seconds_count"):
        was, now = by_class(before, name), by_class(after, name)
        assert {c: now[c] - was[c] for c in now} == {"high": 1, "normal": 1, "low": 1}, name
    labels = {dict(labels).get("priority_class") for (_, labels) in after} - {None}
    assert labels == {"high", "normal", "low"}
    refusals = {(dict(labels)["reason"], dict(labels)["priority_class"])
                for (name, labels) in after if name == "fabricai_refusals_total"}
    assert refusals == {(reason, c) for reason in ("per_key_limit", "rate_limited")
                        for c in ("high", "normal", "low")}


async def test_the_class_holds_over_socketio(priority_server: ServerProcess) -> None:
    """The class of the key a Socket.IO connection authenticated with (CONNECT
    `auth`) orders its prompts as over HTTP."""
    async with httpx.AsyncClient(base_url=priority_server.url, timeout=120) as client:
        # The early one is `normal`: a `high` taken for the default would not pass it.
        completed, positions = await queued_pair(client, early=PLAIN, late=HIGH,
                                                 late_over_socketio=True)
    assert completed == ["late", "early"]
    assert positions == {"early": 0, "late": 0}
