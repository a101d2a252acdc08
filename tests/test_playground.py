"""The playground end to end: the real model behind a real server, driven in a real
headless Chromium (Debian's `/usr/bin/chromium`, through Playwright; no browser is ever
downloaded). Tokens appear before the reply completes, Stop cancels through the server,
sessions reload from the server, 401 / 429 / 503 / unreachable are said clearly, and a
phone-sized viewport does not scroll sideways."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from .server_process import ServerProcess, model_env

pytestmark = pytest.mark.model

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
KEY = "playground-key"
GENERATION_MS = 60_000  # generous: two cores, and the other tests may be busy

LAST_REPLY = "#transcript .msg.assistant >> nth=-1"
STREAMING_WITH_TEXT = """() => {
  const replies = document.querySelectorAll('#transcript .msg.assistant');
  const last = replies[replies.length - 1];
  return !!last && last.dataset.state === 'streaming'
         && last.querySelector('.text').textContent.length > 0;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=GENERATION_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def guarded(model_path: Path, server_logs: Path) -> Iterator[ServerProcess]:
    """API keys on, one slot and no queue: the second request is a 429."""
    env = model_env(
        model_path,
        MAX_CONCURRENT_REQUESTS="1",
        MAX_QUEUE_SIZE="0",
        API_KEYS=KEY,
    )
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


def new_page(browser: Browser, *, width: int = 1000, height: int = 800, key: str = "") -> Page:
    context = browser.new_context(viewport={"width": width, "height": height})
    if key:
        context.add_init_script(f"sessionStorage.setItem('fabricai.apiKey', {key!r})")
    page = context.new_page()
    page.set_default_timeout(GENERATION_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
    return page


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    page = new_page(browser)
    yield page
    assert page.errors == []  # type: ignore[attr-defined]  # no uncaught script error
    page.context.close()


def open_playground(page: Page, url: str) -> None:
    page.goto(url + "/")
    expect(page.locator("#status-conn")).to_have_text("connected")


def settings(page: Page, *, max_tokens: int, temperature: float = 0.8) -> None:
    if page.locator("#settings").get_attribute("open") is None:
        page.locator("#settings summary").click()
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))


def send(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def wait_idle(page: Page) -> None:
    expect(page.locator("#status-active")).to_have_attribute("data-value", "0")
    expect(page.locator("#send")).to_be_enabled()


def test_page_shows_the_server_status(page: Page, server: ServerProcess) -> None:
    open_playground(page, server.url)
    model = httpx.get(f"{server.url}/v1/status").json()["model"]["name"]
    expect(page.locator("#status-model")).to_have_text(f"model {model}")
    expect(page.locator("#status-active")).to_have_text("active 0/2")
    expect(page.locator("#status-queued")).to_have_text("queued 0/2")
    expect(page.locator("#prompt")).to_be_focused()
    expect(page.get_by_label("Prompt")).to_be_visible()


def test_reply_streams_token_by_token(page: Page, server: ServerProcess) -> None:
    open_playground(page, server.url)
    settings(page, max_tokens=160)
    send(page, "Tell me a long story about a cat who sails the sea.")
    # Text is on the page while the reply is still streaming (no `complete` yet)...
    page.wait_for_function(STREAMING_WITH_TEXT, polling=20)
    partial = page.locator(LAST_REPLY).locator(".text").text_content() or ""
    expect(page.locator("#state")).to_have_text("Generating…")
    # ...and the completed reply continues that text.
    reply = page.locator(LAST_REPLY)
    expect(reply).to_have_attribute("data-state", "done")
    final = reply.locator(".text").text_content() or ""
    assert final.startswith(partial) and len(final) > len(partial)
    # The base model may end its text before max_tokens: either way the page says how.
    expect(reply).to_have_attribute("data-finish", re.compile(r"^(length|stop)$"))
    finish = reply.get_attribute("data-finish")
    expect(page.locator("#state")).to_have_text(f"Done ({finish})")
    if finish == "length":
        expect(reply.locator(".meta")).to_contain_text("160 tokens")
    expect(page.locator("#transcript .msg.user .text")).to_have_text(
        "Tell me a long story about a cat who sails the sea.")
    expect(page.locator("#prompt")).to_have_value("")
    wait_idle(page)


def test_stop_cancels_on_the_server(page: Page, server: ServerProcess) -> None:
    open_playground(page, server.url)
    settings(page, max_tokens=500)
    send(page, "Write a very long poem about the ocean.")
    page.wait_for_function(STREAMING_WITH_TEXT, polling=20)
    expect(page.locator("#status-active")).to_have_attribute("data-value", "1")
    page.click("#stop")
    reply = page.locator(LAST_REPLY)
    expect(reply).to_have_attribute("data-finish", "cancelled")
    expect(reply.locator(".meta")).to_contain_text("cancelled")
    expect(page.locator("#state")).to_have_text("Cancelled")
    expect(page.locator("#status-active")).to_have_text("active 0/2")
    wait_idle(page)
    # The server ended it (a `complete` event), and stored the partial turn as cancelled.
    sid = page.locator("#session").input_value()
    messages = httpx.get(f"{server.url}/v1/sessions/{sid}/messages").json()["data"]
    assert messages[-1]["finish_reason"] == "cancelled"
    assert messages[-1]["content"] == reply.locator(".text").text_content()
    assert 0 < messages[-1]["completion_tokens"] < 500


def test_sessions_reload_from_the_server(page: Page, server: ServerProcess) -> None:
    open_playground(page, server.url)
    page.click("#new-session")
    settings(page, max_tokens=24, temperature=0)
    send(page, "My name is Ada.")
    expect(page.locator(LAST_REPLY)).to_have_attribute("data-state", "done")
    sid = page.locator("#session").input_value()
    assert sid
    send(page, "What is my name?")
    expect(page.locator("#transcript .msg")).to_have_count(4)
    expect(page.locator(LAST_REPLY)).to_have_attribute("data-state", "done")
    wait_idle(page)
    replies = page.locator("#transcript .msg.assistant .text").all_text_contents()

    page.reload()
    expect(page.locator("#status-conn")).to_have_text("connected")
    page.click("#new-session")
    expect(page.locator("#transcript .msg")).to_have_count(0)
    option = page.locator(f"#session option[value='{sid}']")
    expect(option).to_contain_text("My name is Ada. · 4 messages")
    page.select_option("#session", sid)
    expect(page.locator("#transcript .msg")).to_have_count(4)
    expect(page.locator("#transcript .msg.user .text")).to_have_text(
        ["My name is Ada.", "What is my name?"])
    expect(page.locator("#transcript .msg.assistant .text")).to_have_text(replies)

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete-session")
    expect(page.locator("#notice")).to_have_text("Conversation deleted.")
    expect(option).to_have_count(0)
    expect(page.locator("#session")).to_have_value("")
    listed = httpx.get(f"{server.url}/v1/sessions").json()["data"]
    assert sid not in {s["id"] for s in listed}


def test_settings_are_checked_here_and_by_the_server(page: Page, server: ServerProcess) -> None:
    open_playground(page, server.url)
    settings(page, max_tokens=0)
    send(page, "Hello")
    expect(page.locator("#notice")).to_contain_text("Max tokens must be a whole number")
    expect(page.locator("#max-tokens")).to_have_attribute("aria-invalid", "true")
    page.fill("#max-tokens", "100000")  # over MAX_TOKENS_LIMIT: only the server knows it
    page.click("#send")
    expect(page.locator("#notice")).to_contain_text(
        "422 invalid_field: max_tokens: must be at most 512 (MAX_TOKENS_LIMIT)")
    expect(page.locator("#max-tokens")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#transcript .msg")).to_have_count(0)
    expect(page.locator("#prompt")).to_have_value("Hello")


def test_503_and_unreachable_are_said_clearly(page: Page, server: ServerProcess) -> None:
    open_playground(page, server.url)

    def loading(route: Route) -> None:
        route.fulfill(status=503, headers={"Retry-After": "1"}, json={"error": {
            "type": "unavailable_error", "code": "model_loading",
            "message": "the model is still loading", "param": None}})

    page.route("**/v1/inference_sse", loading)
    send(page, "Hello")
    expect(page.locator("#notice")).to_have_text(
        "The server is not ready (the model is still loading). Retry after 1 s.")
    page.unroute("**/v1/inference_sse")

    page.route("**/v1/**", lambda route: route.abort("connectionrefused"))
    expect(page.locator("#status-conn")).to_have_text("server unreachable")
    expect(page.locator("#notice")).to_contain_text("Cannot reach the server")
    page.unroute("**/v1/**")
    expect(page.locator("#status-conn")).to_have_text("connected")
    expect(page.locator("#notice")).to_be_hidden()


def test_narrow_viewport_has_no_sideways_scroll(browser: Browser, server: ServerProcess) -> None:
    page = new_page(browser, width=375, height=740)
    try:
        open_playground(page, server.url)
        settings(page, max_tokens=40)
        send(page, "Say hello in " + "many " * 40 + "languages.")
        expect(page.locator(LAST_REPLY)).to_have_attribute("data-state", "done")
        for selector in ("#prompt", "#send", "#stop", "#session", "#max-tokens", "#top-p"):
            box = page.locator(selector).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, selector
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375
        wait_idle(page)
    finally:
        page.context.close()


def test_api_key_is_asked_for_after_a_401(browser: Browser, guarded: ServerProcess) -> None:
    page = new_page(browser)
    try:
        page.goto(guarded.url + "/")
        expect(page.locator("#status-conn")).to_have_text("API key needed")
        expect(page.locator("#auth")).to_be_visible()
        expect(page.locator("#api-key")).to_be_focused()
        page.get_by_role("textbox", name="API key").fill("wrong-key")
        page.click("#save-key")
        expect(page.locator("#auth-why")).to_have_text("the API key or token is not valid")
        page.get_by_role("textbox", name="API key").fill(KEY)
        page.click("#save-key")
        expect(page.locator("#auth")).to_be_hidden()
        expect(page.locator("#status-conn")).to_have_text("connected")
        assert page.evaluate("sessionStorage.getItem('fabricai.apiKey')") == KEY
        settings(page, max_tokens=8)
        send(page, "Hello")
        expect(page.locator(LAST_REPLY)).to_have_attribute("data-state", "done")
        expect(page.locator(LAST_REPLY)).to_have_attribute(
            "data-finish", re.compile(r"^(length|stop)$"))
        wait_idle(page)
    finally:
        page.context.close()


def test_a_full_server_answers_429_with_retry_after(
    browser: Browser, guarded: ServerProcess
) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(f"{guarded.url}/v1/sessions", headers=headers).json()["data"]
    started = threading.Event()

    def hold_the_slot() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 1000, "request_id": "holder"}
        with httpx.Client(base_url=guarded.url, headers=headers, timeout=120) as client, \
                client.stream("POST", "/v1/inference_sse", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("event: token"):
                    started.set()

    holder = threading.Thread(target=hold_the_slot)
    holder.start()
    page = new_page(browser, key=KEY)
    try:
        assert started.wait(60)
        open_playground(page, guarded.url)
        expect(page.locator("#status-active")).to_have_text("active 1/1")
        expect(page.locator("#status-queued")).to_have_text("queued 0/0")
        send(page, "Hello")
        expect(page.locator("#notice")).to_have_text(
            "The server is busy: every slot and the queue are full. Retry after 1 s.")
        expect(page.locator("#state")).to_have_text("Not sent")
        expect(page.locator("#prompt")).to_have_value("Hello")
    finally:
        httpx.post(f"{guarded.url}/v1/inference_sse/holder/cancel", headers=headers)
        holder.join(60)
    expect(page.locator("#status-active")).to_have_text("active 0/1")
    page.context.close()
    # The conversation opened for the refused prompt was taken back.
    deadline = time.monotonic() + 10
    while len(httpx.get(f"{guarded.url}/v1/sessions", headers=headers).json()["data"]) != len(
        before
    ):
        assert time.monotonic() < deadline, "the refused prompt's session was not deleted"
        time.sleep(0.05)


def test_a_dropped_stream_is_resumed_and_says_so(page: Page, server: ServerProcess) -> None:
    """The first response is cut after three tokens (as a dropped connection would cut
    it); the page resumes with `Last-Event-ID`, the reply continues where it stopped
    and ends as the server's `complete` says, and the page tells that it resumed."""
    cut: dict[str, str] = {}

    def cut_after_three_tokens(route: Route) -> None:
        if route.request.method != "POST" or "last-event-id" in route.request.headers:
            route.continue_()
            return
        body = route.fetch().text()
        blocks = body.split("\n\n")
        tokens = [i for i, block in enumerate(blocks) if "event: token" in block]
        kept = "\n\n".join(blocks[: tokens[2] + 1]) + "\n\n"
        cut["kept"] = kept
        cut["full"] = body
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=kept)

    open_playground(page, server.url)
    page.route("**/v1/inference_sse", cut_after_three_tokens)
    settings(page, max_tokens=24, temperature=0)
    send(page, "Tell me about the sea.")
    reply = page.locator(LAST_REPLY)
    expect(reply).to_have_attribute("data-state", "done")
    expect(reply).to_have_attribute("data-resumed", "1")
    expect(page.locator("#notice")).to_contain_text("resumed")
    complete = next(b for b in cut["full"].split("\n\n") if "event: complete" in b)
    text = json.loads(complete.split("data: ", 1)[1])["text"]
    expect(reply.locator(".text")).to_have_text(text)
    page.unroute("**/v1/inference_sse")
    wait_idle(page)
    sid = page.locator("#session").input_value()
    messages = httpx.get(f"{server.url}/v1/sessions/{sid}/messages").json()["data"]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # one turn, stored once


@pytest.fixture(scope="module")
def two_models(server_logs: Path) -> Iterator[ServerProcess]:
    """MODELS at its default: gemma3 and smollm2 (the default)."""
    env = {"LLM_MODEL": "", "CHAT_FORMAT": "", "N_CTX": "1024"}
    with ServerProcess(env, log_dir=server_logs) as proc:
        yield proc


def test_model_picker_defaults_to_the_instruct_model(
    page: Page, two_models: ServerProcess
) -> None:
    open_playground(page, two_models.url)
    picker = page.locator("#model")
    expect(picker.locator("option")).to_have_count(2)
    expect(picker).to_have_value("smollm2")
    expect(page.locator("#status-model")).to_have_text("model smollm2")
    expect(page.locator("#model-hint")).to_contain_text("chat model")
    settings(page, max_tokens=64, temperature=0)
    send(page, "What is the capital of France?")
    reply = page.locator(LAST_REPLY)
    expect(reply).to_have_attribute("data-state", "done")
    # The conversation keeps its model: the picker is locked on it.
    expect(picker).to_be_disabled()
    sid = page.locator("#session").input_value()
    with httpx.Client(base_url=two_models.url, timeout=10) as client:
        stored = client.get(f"/v1/sessions/{sid}/messages").json()["data"]
    # A chat model's conversation opens with the page's short system prompt.
    assert stored[0] == {**stored[0], "role": "system",
                         "content": "You are a helpful assistant."}
    assert [m["model"] for m in stored if m["role"] == "assistant"] == ["smollm2"]
    expect(page.locator("#transcript .msg")).to_have_count(2)  # the system prompt is not shown
    # A new conversation may pick the base model: no system prompt, and it runs there.
    page.click("#new-session")
    expect(picker).to_be_enabled()
    picker.select_option("gemma3")
    expect(page.locator("#status-model")).to_have_text("model gemma3")
    expect(page.locator("#model-hint")).to_contain_text("base model")
    settings(page, max_tokens=8)
    send(page, "Once upon a time")
    expect(page.locator(LAST_REPLY)).to_have_attribute("data-state", "done")
    sid = page.locator("#session").input_value()
    with httpx.Client(base_url=two_models.url, timeout=10) as client:
        stored = client.get(f"/v1/sessions/{sid}/messages").json()["data"]
    assert [(m["role"], m["model"]) for m in stored] == [("user", None), ("assistant", "gemma3")]
    wait_idle(page)
