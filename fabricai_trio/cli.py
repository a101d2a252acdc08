"""`fabricai-trio serve` (and `python -m fabricai_trio`)."""

from __future__ import annotations

import argparse
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import trio

from . import __version__
from .core.engine import ModelLoadError
from .engine.loader import LLAMA_ENGINES
from .engine.model_files import resolve_model_path
from .settings import ConfigError, Settings, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fabricai-trio", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the inference server (the default)")
    serve.add_argument("--host", help="address to listen on (HOST)")
    serve.add_argument("--port", type=int, help="TCP port (PORT)")
    serve.add_argument("--model", type=Path, dest="llm_model",
                       help="path to a .gguf, or gemma3 / smollm2 (LLM_MODEL)")
    serve.add_argument("--max-concurrent", type=int, dest="max_concurrent_requests",
                       help="generations at once (MAX_CONCURRENT_REQUESTS)")
    serve.add_argument("--max-queue", type=int, dest="max_queue_size",
                       help="queued requests before 429 (MAX_QUEUE_SIZE)")
    serve.add_argument("--n-ctx", type=int, dest="n_ctx", help="context window (N_CTX)")
    serve.add_argument("--log-level", dest="log_level", help="log level (LOG_LEVEL)")
    commands.add_parser("healthcheck", help="exit 0 if the local server's /health is 200")
    return parser


def configure_logging(settings: Settings) -> None:
    """LOG_LEVEL and LOG_FORMAT (`text` or `json`) for the whole process."""
    from .api.request_log import configure_logging as configure

    configure(settings)


def serve(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = load_settings(**overrides)
    except ConfigError as exc:
        print(f"fabricai-trio: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    try:
        # Fail before listening when a file is missing or not a model (every model of
        # MODELS, or LLM_MODEL's); the embedded Gemma is assembled here, once, with a
        # progress message.
        if settings.engine in LLAMA_ENGINES:
            for name, model in (settings.served_models() or {"": settings}).items():
                try:
                    resolve_model_path(model.llm_model, settings.model_cache_dir)
                except ModelLoadError as exc:
                    if not name:
                        raise
                    reason = str(exc).removeprefix("LLM_MODEL: ")
                    raise ModelLoadError(f"MODELS: model {name}: {reason}") from None
    except ModelLoadError as exc:
        print(f"fabricai-trio: {exc}", file=sys.stderr)
        return 2
    from .server import serve_app

    try:
        return trio.run(serve_app, settings)
    except ModelLoadError as exc:
        print(f"fabricai-trio: {exc}", file=sys.stderr)
        return 2


def healthcheck() -> int:
    """For container HEALTHCHECKs: ask the server on this host for /health."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"fabricai-trio: {exc}", file=sys.stderr)
        return 2
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{host}:{settings.port}/health", timeout=5) as r:
            return 0 if r.status == 200 else 1
    except (OSError, ValueError) as exc:
        print(f"fabricai-trio: unhealthy: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "healthcheck":
        return healthcheck()
    if args.command is None:
        args = build_parser().parse_args(["serve", *(argv or sys.argv[1:])])
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
