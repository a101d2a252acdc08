"""/openapi.json validates, documents every route of the Quart url_map, agrees with what
the routes answer; /docs renders it without loading anything. In process (fake engine)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from fabricai_trio.app import FabricApp, create_app
from fabricai_trio.settings import Settings

from .fakes import FakeEngine

KEY = "docs-key"


async def make_client(**overrides: Any) -> tuple[FabricApp, httpx.AsyncClient]:
    config = Settings(session_store="memory", **overrides)
    engine = FakeEngine(config)
    await engine.load()
    app = create_app(config, engine=engine)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    return app, httpx.AsyncClient(transport=transport, base_url="http://localhost")


@pytest.fixture
async def served() -> AsyncIterator[tuple[FabricApp, httpx.AsyncClient]]:
    app, client = await make_client()
    async with client:
        yield app, client


async def test_document_is_valid_openapi(served: tuple[FabricApp, httpx.AsyncClient]) -> None:
    _, client = served
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert document["openapi"].startswith("3.1")


async def test_every_route_of_the_url_map_is_documented(
    served: tuple[FabricApp, httpx.AsyncClient],
) -> None:
    app, client = served
    document = (await client.get("/openapi.json")).json()
    registered = {
        (method.lower(), re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule))
        for rule in app.quart.url_map.iter_rules()
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    documented = {
        (method, path) for path, methods in document["paths"].items() for method in methods
    }
    assert registered == documented
    undocumented = [
        (method, path) for path, methods in document["paths"].items()
        for method, op in methods.items() if op.get("x-undocumented")
    ]
    assert undocumented == [], "add these routes to api/openapi.py OPERATIONS"
    for expected in [("post", "/v1/chat/completions"), ("post", "/v1/completions"),
                     ("get", "/v1/models"), ("get", "/metrics"), ("get", "/docs"),
                     ("post", "/v1/inference_sse"), ("delete", "/v1/sessions/{session_id}")]:
        assert expected in documented


async def test_schemas_come_from_the_validating_models(
    served: tuple[FabricApp, httpx.AsyncClient],
) -> None:
    _, client = served
    document = (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False
    assert {"messages", "max_tokens", "max_completion_tokens", "stop", "stream",
            "session_id"} <= set(chat["properties"])
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletionRequest"
    )
    get_sse = document["paths"]["/v1/inference_sse"]["get"]
    assert {p["name"] for p in get_sse["parameters"]} >= {"prompt", "max_tokens", "stop"}


async def test_live_answers_match_their_schemas(
    served: tuple[FabricApp, httpx.AsyncClient],
) -> None:
    """Bodies the routes build by hand (status, health, errors) follow the document."""
    _, client = served
    document = (await client.get("/openapi.json")).json()

    def check(instance: Any, name: str) -> None:
        # The document's refs point into components; jsonschema resolves local $defs.
        text = json.dumps(document["components"]["schemas"])
        defs = json.loads(text.replace("#/components/schemas/", "#/$defs/"))
        jsonschema.validate(instance, {"$ref": f"#/$defs/{name}", "$defs": defs})

    check((await client.get("/v1/status")).json(), "StatusResponse")
    check((await client.get("/health")).json(), "Readiness")
    check((await client.get("/readyz")).json(), "Readiness")
    check((await client.get("/livez")).json(), "Liveness")
    check((await client.get("/v1/models")).json(), "ModelList")
    check((await client.post("/v1/sessions")).json(), "SessionObject")
    check((await client.get("/v1/sessions")).json(), "SessionList")
    check((await client.post("/v1/chat/completions", json={})).json(), "ErrorBody")
    check((await client.get("/nope")).json(), "ErrorBody")


async def test_docs_page_is_self_contained(
    served: tuple[FabricApp, httpx.AsyncClient],
) -> None:
    _, client = served
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert "/v1/chat/completions" in page and "ChatCompletionRequest" in page
    for external in ("<script", "<link", "<img", "<iframe", "@import", "url("):
        assert external not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


async def test_auth_is_described_when_on() -> None:
    _, client = await make_client(api_keys=KEY)
    async with client:
        assert (await client.get("/openapi.json")).status_code == 401
        document = (await client.get("/openapi.json", headers={"X-Api-Key": KEY})).json()
    validate(document)
    assert document["security"] == [{"bearerAuth": []}, {"apiKeyAuth": []}]
    assert document["paths"]["/health"]["get"]["security"] == []
    assert "401" in document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "401" not in document["paths"]["/health"]["get"]["responses"]
