"""`GET /openapi.json` and `GET /docs`, built from the route table below and the same
pydantic models the routes validate with.

Why not quart-schema: it works under quart-trio, but it documents routes through its
own validation decorators (another error shape than our one error body, and decorators
on every route of every module), and its docs pages load their UI from a CDN. Here the
document is generated from `OPERATIONS` and the app's `url_map`: a route missing from
the table still appears (marked `x-undocumented`), and a test fails on it. `/docs` is
plain HTML rendered on the server from the document: it loads nothing.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from quart import Blueprint, Quart, Response, current_app, jsonify

from .. import __version__
from ..core import events, requests
from ..core.errors import ERROR_TABLE, Dialect, ErrorKind
from . import schemas
from .openai import protocol as oai
from .state import EXTENSION_KEY, AppState

# --- bodies that routes build by hand (documented, and checked against live answers) ---


class ErrorDetail(BaseModel):
    """The common fields; some codes add their own (below)."""

    type: str
    code: str
    message: str
    param: str | None
    prompt_tokens: int | None = Field(
        None, description="`context_length_exceeded`: the prompt's tokens (at least this "
        "many when `prompt_tokens_exact` is false: counting stops once it cannot fit)")
    prompt_tokens_exact: bool | None = Field(None, description="`context_length_exceeded`")
    n_ctx: int | None = Field(None, description="`context_length_exceeded`: the context size")
    max_tokens: int | None = Field(
        None, description="`context_length_exceeded`: the reply budget asked for")
    n: int | None = Field(None, description="`too_many_choices`: the choices asked for")
    limit: int | None = Field(
        None, description="`too_many_choices`: the most that can run at once for the caller")


class ErrorBody(BaseModel):
    """Every error, from every route."""

    error: ErrorDetail


class ModelStatus(BaseModel):
    name: str
    path: str | None
    loaded: bool
    n_ctx: int
    chat_format: str | None
    load_error: str | None


class ConcurrencyStatus(BaseModel):
    max: int
    active: int
    queued: int
    queue_capacity: int


class EngineStatus(BaseModel):
    """Engine counters; `ENGINE=batched` adds its batching figures (`steps`,
    `batch_size_last`, `batch_size_mean`, `batch_size_max`, prefix-cache counters...)."""

    model_config = ConfigDict(extra="allow")

    tokens_generated: int
    slots: int


class StatusResponse(BaseModel):
    model: ModelStatus
    concurrency: ConcurrencyStatus
    engine: EngineStatus
    store: schemas.StoreHealth
    uptime_seconds: float
    version: str


# --- the route table ---

Body = type[BaseModel] | str  # a model, or a media type with no schema (e.g. "text/plain")


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    request: type[BaseModel] | None = None
    request_required: bool = True
    query: type[BaseModel] | None = None
    ok_status: int = 200
    ok: Body | None = None
    stream: type[BaseModel] | None = None  # also answers text/event-stream, `data:` of this
    sse_events: tuple[type[BaseModel], ...] = ()  # answers only text/event-stream, named events
    errors: tuple[ErrorKind, ...] = ()
    dialect: Dialect = "native"  # which column of the error table gives the statuses
    description: str = ""
    public: bool = False  # needs no credentials, ever
    extra: dict[str, Any] = field(default_factory=dict)


K = ErrorKind
_GEN_ERRORS = (K.BAD_REQUEST, K.FORBIDDEN, K.NOT_FOUND, K.CONFLICT, K.TOO_LARGE,
               K.INVALID_FIELD, K.OVERLOADED, K.UNAVAILABLE)
_SSE_EVENTS = (events.QueuedEvent, events.TokenEvent, events.CompleteEvent, events.ErrorEvent)

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/livez"): Operation(
        "Liveness: 200 while the process serves", "status", ok=schemas.Liveness, public=True,
    ),
    ("GET", "/readyz"): Operation(
        "Readiness: 200 when the model is loaded and warmed, the session store answers and "
        "the server is not draining; else 503 with the reason", "status",
        ok=schemas.Readiness, errors=(K.UNAVAILABLE,), public=True,
    ),
    ("GET", "/health"): Operation(
        "Readiness (an alias of /readyz)", "status", ok=schemas.Readiness,
        errors=(K.UNAVAILABLE,), public=True,
    ),
    ("GET", "/v1/status"): Operation(
        "Model, concurrency, store and version", "status", ok=StatusResponse,
    ),
    ("POST", "/v1/inference_sse"): Operation(
        "Stream one generation as server-sent events", "generation",
        request=requests.GenerationRequest, sse_events=_SSE_EVENTS, errors=_GEN_ERRORS,
        description="Events: `queued`, `token` (SSE `id` = index), `complete` or `error`; "
        "`: keepalive` comments while queued. Closing the connection cancels the generation.",
    ),
    ("GET", "/v1/inference_sse"): Operation(
        "The same, with the fields as query parameters (for EventSource)", "generation",
        query=requests.GenerationRequest, sse_events=_SSE_EVENTS, errors=_GEN_ERRORS,
    ),
    ("POST", "/v1/inference_sse/<request_id>/cancel"): Operation(
        "Cancel one of your running SSE streams", "generation", ok=schemas.CancelResult,
        errors=(K.NOT_FOUND,),
        description="The stream stops within one token (or leaves the queue) and ends with "
        "`complete`, `finish_reason: cancelled`; a session turn is stored as cancelled. "
        "404 `request_not_found` when none of your streams with this id is running.",
    ),
    ("POST", "/v1/sessions"): Operation(
        "Create a session", "sessions", request=schemas.SessionCreateRequest,
        request_required=False, ok_status=201, ok=schemas.SessionObject,
        errors=(K.BAD_REQUEST, K.CONFLICT, K.TOO_LARGE, K.INVALID_FIELD, K.UNAVAILABLE),
    ),
    ("GET", "/v1/sessions"): Operation(
        "The caller's sessions, most recent first", "sessions", ok=schemas.SessionList,
        errors=(K.UNAVAILABLE,),
    ),
    ("GET", "/v1/sessions/<session_id>"): Operation(
        "One session (without messages)", "sessions", ok=schemas.SessionObject,
        errors=(K.FORBIDDEN, K.NOT_FOUND, K.UNAVAILABLE),
    ),
    ("GET", "/v1/sessions/<session_id>/messages"): Operation(
        "A session's messages, oldest first", "sessions", ok=schemas.SessionMessages,
        errors=(K.FORBIDDEN, K.NOT_FOUND, K.UNAVAILABLE),
    ),
    ("DELETE", "/v1/sessions/<session_id>"): Operation(
        "Delete a session", "sessions", ok_status=204,
        errors=(K.FORBIDDEN, K.NOT_FOUND, K.UNAVAILABLE),
    ),
    ("POST", "/v1/chat/completions"): Operation(
        "OpenAI-compatible chat completion", "openai", request=oai.ChatCompletionRequest,
        ok=oai.ChatCompletionResponse, stream=oai.ChatCompletionChunk, errors=_GEN_ERRORS,
        dialect="openai",
        description="`stream: true` answers `data: {chunk}` lines and `data: [DONE]`. "
        "`tools` / `tool_choice` / `parallel_tool_calls`: tool calling, with `tool_calls` "
        "in the message (streamed as `delta.tool_calls`) and `finish_reason: tool_calls` "
        "(docs/openai.md). Unsupported fields (logprobs, n > 1, …) are a 400 naming the "
        "field. `session_id` (extension) continues a stored session.",
    ),
    ("POST", "/v1/completions"): Operation(
        "OpenAI-compatible text completion", "openai", request=oai.CompletionRequest,
        ok=oai.CompletionResponse, stream=oai.CompletionChunk, errors=_GEN_ERRORS,
        dialect="openai",
    ),
    ("GET", "/v1/models"): Operation("The served models", "openai", ok=oai.ModelList),
    ("POST", "/v1/tokenize"): Operation(
        "The tokens a generation of this body would decode", "tokens",
        request=requests.GenerationRequest, ok=schemas.TokenizeResponse,
        errors=(K.BAD_REQUEST, K.NOT_FOUND, K.CONFLICT, K.TOO_LARGE, K.INVALID_FIELD,
                K.UNAVAILABLE),
        description="The body of `POST /v1/inference_sse` (`prompt`, or `messages` and an "
        "optional `session_id`; `model`, `max_tokens`): the chat template, the session's "
        "history and its trimming apply as for a generation. Nothing is generated and no "
        "queue place is taken; a prompt that does not fit is 400 `context_length_exceeded`.",
    ),
    ("POST", "/v1/detokenize"): Operation(
        "Token ids back to text", "tokens", request=schemas.DetokenizeRequest,
        ok=schemas.DetokenizeResponse, errors=(K.BAD_REQUEST, K.NOT_FOUND, K.INVALID_FIELD,
                                               K.UNAVAILABLE),
    ),
    ("GET", "/metrics"): Operation(
        "Prometheus metrics (text exposition format)", "operations", ok="text/plain",
    ),
    ("GET", "/openapi.json"): Operation(
        "This document", "operations", ok="application/json",
    ),
    ("GET", "/static/<path:filename>"): Operation(
        "Static files (Quart's default route; the server ships none)", "operations",
        ok="application/octet-stream", errors=(K.NOT_FOUND,),
    ),
    ("GET", "/docs"): Operation(
        "This document as a web page (no external resources)", "operations", ok="text/html",
    ),
    ("GET", "/"): Operation(
        "The playground: a chat page (no credentials needed to load it)", "playground",
        ok="text/html", public=True,
    ),
    ("GET", "/playground/<asset>"): Operation(
        "The playground's script (`playground.js`) and style sheet (`playground.css`)",
        "playground", ok="text/javascript", errors=(K.NOT_FOUND,), public=True,
    ),
}

_OK_TEXT = {200: "OK", 201: "Created", 204: "No content"}
_ERROR_TEXT = {
    K.BAD_REQUEST: "Bad request (names the field)",
    K.INVALID_FIELD: "Invalid field (names it)",
    K.UNAUTHENTICATED: "Missing or invalid credentials (`WWW-Authenticate` says why)",
    K.FORBIDDEN: "Another identity's session",
    K.NOT_FOUND: "Not found",
    K.CONFLICT: "Session busy or exists, or a duplicate request_id",
    K.TOO_LARGE: "Body too large",
    K.OVERLOADED: "Queue full (`queue_full`), this identity's share of it taken "
    "(`per_key_limit`), or its rate limit reached (`rate_limited`, with `X-RateLimit-*`); "
    "`Retry-After` says when to retry",
    K.UNAVAILABLE: "Model loading, store down, or draining (`Retry-After`)",
}


# --- building the document ---


def _path(rule: str) -> tuple[str, list[str]]:
    names = re.findall(r"<(?:[^:<>]+:)?([^<>]+)>", rule)
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule), names


def _models() -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = [ErrorBody]
    for op in OPERATIONS.values():
        for model in (op.request, op.query, op.ok, op.stream, *op.sse_events):
            if isinstance(model, type) and model not in found:
                found.append(model)
    return found


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def build_document(app: Quart, *, auth_enabled: bool, metrics_public: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route in `app.url_map`."""
    models = _models()
    refs, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    components = dict(defs.get("$defs", {}))
    ref_of = {m: refs[(m, "validation")] for m in models}
    query_schema = requests.GenerationRequest.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        path, params = _path(rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            op = OPERATIONS.get((method, rule.rule))
            entry = _operation(op, rule.endpoint, params, ref_of, query_schema)
            if op is not None and auth_enabled and (
                op.public or (rule.rule == "/metrics" and metrics_public)
            ):
                entry["security"] = []
            if auth_enabled and (op is None or not op.public):
                entry["responses"].update(_error_responses((K.UNAUTHENTICATED,), "native"))
            paths.setdefault(path, {})[method.lower()] = entry
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "fabricai-trio",
            "version": __version__,
            "description": "Local LLM inference: SSE, OpenAI-compatible routes, sessions.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "An API key, or a JWT"},
                "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            },
        },
    }
    if auth_enabled:
        document["security"] = [{"bearerAuth": []}, {"apiKeyAuth": []}]
    return document


def _error_responses(kinds: tuple[ErrorKind, ...], dialect: Dialect) -> dict[str, Any]:
    """The error responses of these kinds, with the statuses the error table gives."""
    texts: dict[str, list[str]] = {}
    for kind in kinds:
        row = ERROR_TABLE[kind]
        status = row.openai_status if dialect == "openai" else row.status
        texts.setdefault(str(status), []).append(_ERROR_TEXT[kind])
    return {
        status: {
            "description": "; ".join(text),
            "content": {"application/json": {"schema": _ref("ErrorBody")}},
        }
        for status, text in sorted(texts.items())
    }


def _content(body: Body, ref_of: dict[type[BaseModel], Any]) -> dict[str, Any]:
    if isinstance(body, str):
        return {body: {"schema": {"type": "object"} if body.endswith("json") else {
            "type": "string"}}}
    return {"application/json": {"schema": ref_of[body]}}


def _operation(
    op: Operation | None,
    endpoint: str,
    params: list[str],
    ref_of: dict[type[BaseModel], Any],
    query_schema: dict[str, Any],
) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in params
    ]
    if op is None:
        return {
            "operationId": endpoint, "summary": endpoint, "x-undocumented": True,
            "parameters": parameters, "responses": {"default": {"description": "undocumented"}},
        }
    entry: dict[str, Any] = {"operationId": endpoint, "summary": op.summary, "tags": [op.tag]}
    if op.description:
        entry["description"] = op.description
    if op.query is not None:
        for name, schema in query_schema["properties"].items():
            if name == "messages":
                continue
            parameters.append({
                "name": name, "in": "query", "required": name == "prompt", "schema": schema,
                **({"style": "form", "explode": True} if name == "stop" else {}),
            })
    if parameters:
        entry["parameters"] = parameters
    if op.request is not None:
        entry["requestBody"] = {
            "required": op.request_required,
            "content": {"application/json": {"schema": ref_of[op.request]}},
        }
    ok: dict[str, Any] = {"description": _OK_TEXT[op.ok_status]}
    if op.ok is not None:
        ok["content"] = _content(op.ok, ref_of)
    if op.stream is not None:
        ok.setdefault("content", {})["text/event-stream"] = {
            "schema": {"type": "string", "description": "`data: <chunk JSON>` lines, then "
                       "`data: [DONE]`"},
            "x-data-schema": ref_of[op.stream],
        }
    if op.sse_events:
        ok["content"] = {"text/event-stream": {
            "schema": {"type": "string", "description": "Named SSE events"},
            "x-events": {
                name: ref_of[model]
                for model, name in events.EVENT_NAMES.items() if model in op.sse_events
            },
        }}
    responses: dict[str, Any] = {str(op.ok_status): ok}
    responses.update(_error_responses(op.errors, op.dialect))
    entry["responses"] = responses
    return entry


def document_for(app: Quart) -> dict[str, Any]:
    """The app's document, built once (the url_map is fixed once serving starts)."""
    cached = app.extensions.get("fabricai.openapi")
    if cached is None:
        state = cast(AppState, app.extensions[EXTENSION_KEY])
        cached = build_document(
            app,
            auth_enabled=state.auth.enabled,
            metrics_public=not state.settings.metrics_require_auth,
        )
        app.extensions["fabricai.openapi"] = cached
    return cast(dict[str, Any], cached)


# --- the docs page ---

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;
color:#1d232a}h1{margin-bottom:0}code,pre{font:13px ui-monospace,monospace}
pre{background:#f4f6f8;padding:.6rem;overflow:auto;border-radius:4px}
.op{border:1px solid #d8dde3;border-radius:6px;margin:.8rem 0;padding:.4rem .8rem}
.m{display:inline-block;min-width:4.2rem;font-weight:700}.GET{color:#1769aa}
.POST{color:#2e7d32}.DELETE{color:#c62828}table{border-collapse:collapse}
td,th{border-bottom:1px solid #e4e7eb;padding:.2rem .6rem;text-align:left;vertical-align:top}
summary{cursor:pointer}
"""


def _schema_link(schema: Any) -> str:
    ref = schema.get("$ref", "") if isinstance(schema, dict) else ""
    if ref.startswith("#/components/schemas/"):
        name = html.escape(ref.rsplit("/", 1)[1])
        return f'<a href="#schema-{name}">{name}</a>'
    return f"<code>{html.escape(json.dumps(schema))}</code>"


def render_docs(document: dict[str, Any]) -> str:
    """A self-contained HTML page: inline CSS, no script, no external resource."""
    e = html.escape
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{e(document['info']['title'])} API</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(document['info']['title'])} <small>{e(document['info']['version'])}</small></h1>",
        f"<p>{e(document['info'].get('description', ''))} "
        '<a href="/openapi.json">openapi.json</a></p>',
    ]
    if document.get("security"):
        out.append("<p>Authentication: <code>Authorization: Bearer &lt;API key or JWT&gt;</code>"
                   " or <code>X-Api-Key</code>.</p>")
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            verb = method.upper()
            out.append(f'<div class=op><h3><span class="m {verb}">{verb}</span>'
                       f"<code>{e(path)}</code></h3><p>{e(op.get('summary', ''))}</p>")
            if op.get("description"):
                out.append(f"<p>{e(op['description'])}</p>")
            if op.get("parameters"):
                out.append("<table><tr><th>Parameter</th><th>In</th><th>Schema</th></tr>")
                for p in op["parameters"]:
                    req = " (required)" if p.get("required") else ""
                    out.append(f"<tr><td><code>{e(p['name'])}</code>{req}</td>"
                               f"<td>{e(p['in'])}</td><td>{_schema_link(p['schema'])}</td></tr>")
                out.append("</table>")
            body = op.get("requestBody")
            if body:
                schema = body["content"]["application/json"]["schema"]
                out.append(f"<p>Body: {_schema_link(schema)}</p>")
            out.append("<table><tr><th>Status</th><th>Meaning</th><th>Body</th></tr>")
            for status, response in op["responses"].items():
                bodies = []
                for media, content in response.get("content", {}).items():
                    schema = content.get("x-data-schema") or content.get("schema", {})
                    events = content.get("x-events")
                    shown = (", ".join(f"{e(k)}: {_schema_link(v)}" for k, v in events.items())
                             if events else _schema_link(schema))
                    bodies.append(f"<code>{e(media)}</code> {shown}")
                out.append(f"<tr><td>{e(status)}</td><td>{e(response['description'])}</td>"
                           f"<td>{'<br>'.join(bodies)}</td></tr>")
            out.append("</table></div>")
    out.append("<h2>Schemas</h2>")
    for name, schema in document["components"]["schemas"].items():
        out.append(f'<details id="schema-{e(name)}"><summary><code>{e(name)}</code></summary>'
                   f"<pre>{e(json.dumps(schema, indent=2))}</pre></details>")
    out.append("</body></html>")
    return "\n".join(out)


blueprint = Blueprint("openapi", __name__)

#: The page may not load anything: not a script, a style sheet, a font or an image.
DOCS_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


@blueprint.get("/openapi.json")
async def openapi_json() -> Response:
    return jsonify(document_for(current_app))


@blueprint.get("/docs")
async def docs() -> Response:
    page = render_docs(document_for(current_app))
    return Response(page, content_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": DOCS_CSP})
