"""The playground's files: served from the package at `/` and `/playground/…`, public
even with auth on, same-origin only (CSP, and no external URL in any file), every form
control labelled. In process (fake engine, no browser)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from fabricai_trio.api.playground import ASSETS, WEB_DIR
from fabricai_trio.app import create_app
from fabricai_trio.settings import Settings

from .fakes import FakeEngine


async def make_client(**overrides: Any) -> httpx.AsyncClient:
    settings = Settings(session_store="memory", **overrides)
    engine = FakeEngine(settings)
    await engine.load()
    transport = httpx.ASGITransport(app=create_app(settings, engine=engine))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://localhost")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with await make_client() as c:
        yield c


async def test_page_and_assets_are_served(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert '<script type="module" src="/playground/playground.js">' in page.text
    assert '<link rel="stylesheet" href="/playground/playground.css">' in page.text
    script = await client.get("/playground/playground.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "/v1/inference_sse" in script.text
    style = await client.get("/playground/playground.css")
    assert style.headers["content-type"].startswith("text/css")
    for missing in ("/playground/index.html", "/playground/nope.js", "/playground/..%2Fapp.py"):
        response = await client.get(missing)
        assert response.status_code == 404, missing
        assert response.json()["error"]["code"] == "not_found"


async def test_the_page_needs_no_credentials_but_the_api_does() -> None:
    async with await make_client(api_keys="page-key") as client:
        assert (await client.get("/")).status_code == 200
        for name in ASSETS:
            assert (await client.get(f"/playground/{name}")).status_code == 200
        assert (await client.get("/v1/status")).status_code == 401
        assert (await client.post("/v1/inference_sse/x/cancel")).status_code == 401
        cancel = await client.post("/v1/inference_sse/x/cancel",
                                   headers={"Authorization": "Bearer page-key"})
        assert cancel.status_code == 404
        document = (await client.get("/openapi.json", headers={"X-Api-Key": "page-key"})).json()
    assert document["paths"]["/"]["get"]["security"] == []
    assert document["paths"]["/playground/{asset}"]["get"]["security"] == []
    assert "401" in document["paths"]["/v1/inference_sse/{request_id}/cancel"]["post"][
        "responses"]


def test_static_files_reference_no_other_host() -> None:
    files = sorted(WEB_DIR.iterdir())
    assert {f.name for f in files} >= {"index.html", *ASSETS}
    for path in files:
        text = path.read_text()
        assert not re.search(r"https?://", text), path.name
        assert not re.search(r"""(src|href)\s*=\s*["']?//""", text), path.name
        assert "@import" not in text and "url(" not in text, path.name
        assert "fetch(\"http" not in text and "new WebSocket" not in text, path.name


class _Controls(HTMLParser):
    """Ids of form controls and the `for` of labels."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[str] = []
        self.labelled: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag in ("input", "select", "textarea"):
            self.controls.append(attributes.get("id") or f"<{tag} without id>")
        if tag == "label" and attributes.get("for"):
            self.labelled.add(str(attributes["for"]))


def test_every_control_has_a_label() -> None:
    page = (WEB_DIR / "index.html").read_text()
    parser = _Controls()
    parser.feed(page)
    assert len(parser.controls) >= 7
    assert set(parser.controls) <= parser.labelled, set(parser.controls) - parser.labelled
    assert '<html lang="en">' in page and 'name="viewport"' in page
    assert 'aria-live="polite"' in page and 'role="status"' in page and 'role="alert"' in page
