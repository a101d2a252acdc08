"""Model backends behind the `Engine` protocol."""

from .base import (
    ChatPrompt,
    Chunk,
    Engine,
    EngineError,
    EngineInfo,
    EngineRequest,
    Finish,
    ModelLoadError,
)
from .loader import create_engine

__all__ = [
    "ChatPrompt",
    "Chunk",
    "Engine",
    "EngineError",
    "EngineInfo",
    "EngineRequest",
    "Finish",
    "ModelLoadError",
    "create_engine",
]
