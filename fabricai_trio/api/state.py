"""What the HTTP routes and the Socket.IO events need from the app, in one object.

app.py (the composition layer) builds an `AppState` and stores it on the Quart app;
transports read it with `state()`. Nothing here imports app.py, so the transports never
depend on the composition layer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, cast

from quart import current_app

from ..admission import Admission
from ..auth import Authenticator
from ..core.engine import Engine
from ..generation import GenerationService
from ..metrics import Metrics
from ..models import ModelSet
from ..sessions import Session, SessionStore
from ..settings import Settings
from .schemas import Readiness, StartupProgress, StoreHealth

EXTENSION_KEY = "fabricai"


@dataclass
class AppState:
    settings: Settings
    models: ModelSet
    store: SessionStore
    service: GenerationService
    metrics: Metrics
    auth: Authenticator
    started_at: float = field(default_factory=time.time)
    load_error: str | None = None
    store_healthy: bool = True
    #: Start-up: `loading` the models, `warming` them up (one token each), `ready`, or
    #: `failed` (any model that fails to load fails the start-up).
    phase: Literal["loading", "warming", "ready", "failed"] = "loading"
    phase_since: float = field(default_factory=time.monotonic)
    #: Called after a session is deleted (Socket.IO empties its room on every replica).
    session_deleted_hooks: list[Callable[[Session], Awaitable[None]]] = field(
        default_factory=list
    )

    async def session_deleted(self, session: Session) -> None:
        """Run the hooks, in order. Cancelled: the remaining hooks do not run."""
        for hook in self.session_deleted_hooks:
            await hook(session)

    @property
    def engine(self) -> Engine:
        """The default model's engine."""
        return self.models.default.engine

    @property
    def admission(self) -> Admission:
        """The default model's admission."""
        return self.models.default.admission

    def enter(self, phase: Literal["loading", "warming", "ready", "failed"]) -> None:
        self.phase, self.phase_since = phase, time.monotonic()

    def readiness(self) -> Readiness:
        """Whether this replica takes traffic (`status == "ready"`), and why not.

        Ready: every model is loaded and warmed, the session store answers (when sessions
        live outside the process), and the server is not draining."""
        store = StoreHealth(backend=self.store.backend, healthy=self.store_healthy)
        if self.service.draining:
            return Readiness(status="draining", reason="the server is shutting down",
                             store=store)
        if self.phase == "failed":
            # Not `load_error`: it names the model's path, and the probes are public
            # (`/v1/status`, behind authentication, has it).
            return Readiness(status="failed", reason="the model failed to load", store=store)
        if self.phase != "ready":
            seconds = round(time.monotonic() - self.phase_since, 3)
            what = "the model" if len(self.models) == 1 else "the models"
            return Readiness(status=self.phase, reason=f"{self.phase} {what}", store=store,
                             progress=StartupProgress(phase=self.phase, seconds=seconds))
        if not self.store_healthy and self.store.backend != "memory":
            return Readiness(status="store_unavailable",
                             reason="the session store does not answer", store=store)
        return Readiness(status="ready", store=store)


def state() -> AppState:
    """The state of the app serving the current request."""
    return cast(AppState, current_app.extensions[EXTENSION_KEY])
