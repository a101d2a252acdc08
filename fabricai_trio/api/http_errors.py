"""Domain errors as Quart responses, through the one table in `core.errors`.

Every failure leaves an HTTP route as `{"error": {"type", "code", "message", "param"}}`
with the status the table gives; werkzeug's own errors (an unknown route, a method not
allowed, a body over MAX_BODY_BYTES) are first turned into the domain errors they are.
The OpenAI-compatible routes mark their requests so the table's OpenAI column is used.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from quart import Quart, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound

from ..core.errors import (
    BodyTooLarge,
    Dialect,
    DomainError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    http_error,
)

log = logging.getLogger(__name__)

#: `request.scope` key: the error dialect of the route serving this request.
DIALECT_SCOPE_KEY = "fabricai.error_dialect"


def use_dialect(dialect: Dialect) -> None:
    """Answer errors of the current request in `dialect` (set by the OpenAI routes)."""
    cast(dict[str, Any], request.scope)[DIALECT_SCOPE_KEY] = dialect


def current_dialect() -> Dialect:
    dialect = cast(dict[str, Any], request.scope).get(DIALECT_SCOPE_KEY)
    return "openai" if dialect == "openai" else "native"


def error_response(error: DomainError, dialect: Dialect = "native") -> Response:
    rendered = http_error(error, dialect=dialect)
    response = jsonify(rendered.body)
    response.status_code = rendered.status
    response.headers.update(rendered.headers)
    return response


def _werkzeug_error(error: HTTPException, max_body: int) -> DomainError:
    if isinstance(error, WerkzeugNotFound):
        return NotFound("no such route")
    if isinstance(error, WerkzeugMethodNotAllowed):
        return MethodNotAllowed("method not allowed on this route")
    if isinstance(error, RequestEntityTooLarge):
        return BodyTooLarge(max_body)
    log.error("unexpected HTTP error %s: %s", error.code, error.description)
    return InternalError()


def register_error_handlers(app: Quart) -> None:
    def respond(error: DomainError) -> Response:
        return error_response(error, current_dialect())

    @app.errorhandler(DomainError)
    async def _domain_error(error: DomainError) -> Response:
        return respond(error)

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        response = respond(_werkzeug_error(error, app.config["MAX_CONTENT_LENGTH"]))
        if isinstance(error, RequestEntityTooLarge):
            # The rest of the body is unread: the connection cannot be reused safely.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error", exc_info=error)
        return respond(InternalError())
