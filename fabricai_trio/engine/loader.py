"""Picking the engine backend from `ENGINE`."""

from __future__ import annotations

import importlib

from ..core.engine import Engine, ModelLoadError
from ..settings import Settings

LLAMA_ENGINES = frozenset({"llama", "batched"})
"""Built-in engines that read LLM_MODEL."""


def create_engine(settings: Settings) -> Engine:
    """`llama` (the default), `batched`, or `module:Class` constructed with the settings."""
    if settings.engine == "llama":
        from .llama import LlamaEngine

        return LlamaEngine(settings)
    if settings.engine == "batched":
        from .batched import BatchedEngine

        return BatchedEngine(settings)
    module_name, _, class_name = settings.engine.partition(":")
    if not module_name or not class_name:
        raise ModelLoadError(
            f"ENGINE: expected `llama`, `batched` or `module:Class`, got {settings.engine!r}"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"ENGINE: cannot load {settings.engine!r}: {exc}") from None
    engine = cls(settings)
    if not isinstance(engine, Engine):
        raise ModelLoadError(f"ENGINE: {settings.engine!r} does not implement the Engine protocol")
    return engine
