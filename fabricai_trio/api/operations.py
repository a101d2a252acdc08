"""HTTP routes for operators: `/v1/status`, the probes (`/livez`, `/readyz`, `/health`)
and `/metrics`."""

from __future__ import annotations

import time
from typing import Any

from quart import Blueprint, Response, jsonify

from .. import __version__
from ..core.errors import ERROR_TABLE, ErrorKind
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..models import ServedModel
from .schemas import Liveness
from .state import state

blueprint = Blueprint("operations", __name__)


def model_status(model: ServedModel, load_error: str | None) -> dict[str, Any]:
    """One model's part of `/v1/status`: the model, its admission, its engine."""
    info = model.engine.info()
    stats = model.admission.stats()
    return {
        "model": {
            "name": model.name,
            "path": info.model_path,
            "loaded": info.loaded,
            "n_ctx": info.n_ctx,
            "chat_format": info.chat_format,
            "chat_template_source": info.chat_template_source,
            "load_error": load_error,
        },
        "concurrency": {
            "max": stats.max_concurrent,
            "active": stats.active,
            "queued": stats.queued,
            "queue_capacity": stats.queue_capacity,
        },
        "engine": {"tokens_generated": info.tokens_generated, "slots": info.slots,
                   **info.extra},
    }


@blueprint.get("/v1/status")
async def status() -> Response:
    """Every model under `models` (by name); `model`, `concurrency` and `engine` at the
    top are the default model's (what a one-model server has always reported)."""
    app = state()
    models = {m.name: model_status(m, app.load_error) for m in app.models}
    return jsonify(
        {
            **models[app.models.default.name],
            "default_model": app.models.default.name,
            "models": models,
            "store": {"backend": app.store.backend, "healthy": app.store_healthy},
            "uptime_seconds": round(time.time() - app.started_at, 3),
            "version": __version__,
        }
    )


@blueprint.get("/livez")
async def livez() -> Response:
    """Liveness: the process serves HTTP (whatever the model, the store or a drain)."""
    return jsonify(Liveness().model_dump())


@blueprint.get("/readyz")
async def readyz() -> Response:
    """Readiness (`/health` is an alias): 200 when this replica takes traffic, else 503
    with `Retry-After` and a reason (loading with its progress, failed, store down,
    draining): the table's status for an unavailable server."""
    readiness = state().readiness()
    response = jsonify(readiness.model_dump(exclude_none=True))
    if readiness.status != "ready":
        response.status_code = ERROR_TABLE[ErrorKind.UNAVAILABLE].status
        response.headers["Retry-After"] = "1"
    return response


@blueprint.get("/health")
async def health() -> Response:
    """An alias of `/readyz` (what older probes and the image's HEALTHCHECK call)."""
    return await readyz()


@blueprint.get("/metrics")
async def metrics() -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(state().metrics.render(), content_type=METRICS_CONTENT_TYPE)
