"""What the HTTP routes and the Socket.IO events need from the app, in one object.

app.py (the composition layer) builds an `AppState` and stores it on the Quart app;
transports read it with `state()`. Nothing here imports app.py, so the transports never
depend on the composition layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import cast

from quart import current_app

from ..admission import Admission
from ..auth import Authenticator
from ..core.engine import Engine
from ..generation import GenerationService
from ..metrics import Metrics
from ..sessions import SessionStore
from ..settings import Settings

EXTENSION_KEY = "fabricai"


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    store: SessionStore
    admission: Admission
    service: GenerationService
    metrics: Metrics
    auth: Authenticator
    started_at: float = field(default_factory=time.time)
    load_error: str | None = None
    store_healthy: bool = True


def state() -> AppState:
    """The state of the app serving the current request."""
    return cast(AppState, current_app.extensions[EXTENSION_KEY])
