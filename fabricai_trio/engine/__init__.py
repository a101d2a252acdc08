"""Model backends behind the `core.engine.Engine` protocol; `create_engine` picks one."""

from .loader import create_engine

__all__ = ["create_engine"]
