"""Quart error handlers: every failure leaves as the one JSON error body."""

from __future__ import annotations

import logging

from quart import Quart, Response, jsonify
from werkzeug.exceptions import HTTPException

from .errors import ApiError

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_response(error: ApiError) -> Response:
    response = jsonify(error.body())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def register_error_handlers(app: Quart) -> None:
    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = {
            404: "no such route",
            405: "method not allowed on this route",
            413: f"the body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes",
        }.get(status, error.description or error.name)
        response = error_response(ApiError(status, code, message))
        if status == 413:
            # The rest of the body is unread: the connection cannot be reused safely.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error", exc_info=error)
        return error_response(ApiError(500, "internal_error", "internal server error"))
