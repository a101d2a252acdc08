"""A browser's own `EventSource`, left open well past its retry delay, on the real model:
one generation and one stored turn for one question. The stream's events carry ids; when
the stream ends the browser reconnects with `Last-Event-ID` (the HTML spec's retry, about
3 s), gets 204 because nothing is missing, and stops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from .live import scrape, value
from .server_process import ServerProcess, model_env

pytestmark = pytest.mark.model

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

OPEN_EVENTSOURCE = """(url) => {
  window.seen = [];
  const source = new EventSource(url);
  window.source = source;
  for (const name of ['queued', 'token', 'complete']) {
    source.addEventListener(name, (e) => window.seen.push([name, e.lastEventId]));
  }
  source.onerror = () => window.seen.push(['onerror', String(source.readyState)]);
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def test_eventsource_left_open_gives_one_generation_and_one_turn(
    browser: Browser, model_path: Path, server_logs: Path
) -> None:
    env = model_env(model_path, SESSION_AUTOCREATE="true")
    with ServerProcess(env, log_dir=server_logs) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        query = "prompt=What%20is%20the%20capital%20of%20France%3F&max_tokens=8&session_id=es-1"
        page.evaluate(OPEN_EVENTSOURCE, f"/v1/inference_sse?{query}")
        # The stream ends, the browser reconnects by itself (Last-Event-ID), gets 204
        # and closes for good: readyState CLOSED (2).
        page.wait_for_function("() => window.source.readyState === 2", timeout=60_000)
        seen = page.evaluate("() => window.seen")
        names = [name for name, _ in seen]
        assert names.count("complete") == 1 and names.count("queued") == 1
        ids = [event_id for name, event_id in seen if name != "onerror"]
        assert all(event_id.rsplit(":", 1)[1].isdigit() for event_id in ids)
        assert names[-1] == "onerror"  # the 204 after the reconnect
        page.close()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            messages = client.get("/v1/sessions/es-1/messages").json()["data"]
            assert [m["role"] for m in messages] == ["user", "assistant"]
            samples = scrape(client)
            generations = sum(
                value(samples, "fabricai_generations_total", finish_reason=reason)
                for reason in ("stop", "length", "cancelled", "error")
            )
            assert generations == 1
