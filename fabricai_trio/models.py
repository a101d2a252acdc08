"""The models one server serves: each with its own engine and its own admission.

A request's `model` picks one by name (`ModelSet.get`); capacity and queue are per model
(one `Admission` each), so a busy model never queues a request for an idle one. The one
`GenerationService` still owns every live generation, whatever its model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .admission import Admission, Ticket
from .core.engine import Engine
from .core.errors import ModelNotFound
from .queue_policy import FairPolicy, FifoPolicy, PriorityPolicy, QueuePolicy
from .settings import Settings


@dataclass(eq=False, slots=True)
class ServedModel:
    """One model: its name in the API, its settings (`n_ctx`, `llm_model`…), its engine
    and its admission (MAX_CONCURRENT_REQUESTS slots, MAX_QUEUE_SIZE queue)."""

    name: str
    settings: Settings
    engine: Engine
    admission: Admission

    @classmethod
    def build(cls, name: str, settings: Settings, engine: Engine) -> ServedModel:
        """Admission is sized from what the engine says it runs at once (no engine keeps
        a waiting line of its own)."""
        admission = Admission(
            max_concurrent=engine.info().slots,
            max_queue=settings.max_queue_size,
            retry_after=settings.retry_after_seconds,
            policy=queue_policy(settings),
            max_concurrent_per_key=settings.max_concurrent_per_key,
            max_queued_per_key=settings.max_queued_per_key,
            classes=settings.priority_class_names,
            default_class=settings.resolved_priority_default_class,
        )
        return cls(name, settings, engine, admission)


def queue_policy(settings: Settings) -> QueuePolicy[Ticket]:
    """QUEUE_POLICY's policy; with more than one of PRIORITY_CLASSES, one such per
    class under a `PriorityPolicy`."""
    def inner() -> QueuePolicy[Ticket]:
        return FairPolicy() if settings.queue_policy == "fair" else FifoPolicy()

    classes = settings.priority_class_names
    if len(classes) == 1:
        return inner()
    return PriorityPolicy([inner() for _ in classes],
                          starvation_limit=settings.priority_starvation_limit)


class ModelSet:
    """The served models by name, the default one first."""

    def __init__(self, models: Sequence[ServedModel], default: str | None = None) -> None:
        if not models:
            raise ValueError("a server serves at least one model")
        self._models = {m.name: m for m in models}
        if len(self._models) != len(models):
            raise ValueError("two models have the same name")
        self.default = self._models[default] if default is not None else models[0]

    def get(self, name: str | None) -> ServedModel:
        """The model called `name`; the default for None. Raises `ModelNotFound`."""
        if name is None:
            return self.default
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name, self.names)
        return model

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)
