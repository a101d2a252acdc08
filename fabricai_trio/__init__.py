"""fabricai-trio: a local LLM inference server on Trio's structured concurrency."""

__version__ = "0.1.0"
