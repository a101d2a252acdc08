"""The text side of a llama.cpp model, shared by the engines: which file, its tokenizer,
its chat template and the name the API reports.

Tokenizing uses a vocab-only `llama_cpp.Llama` (no weights, no context), so it never
touches a context a generation holds and can run in any worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import llama_cpp
import trio

from ..core.engine import ChatPrompt, EngineError, ModelLoadError
from ..core.messages import ChatMessage
from ..settings import Settings
from .chat import ChatTemplate
from .model_files import EMBEDDED_ALIAS, EMBEDDED_CHAT_FORMAT, resolve_model_path


class ModelText:
    """`load()` it, then ask for tokens, chat prompts and the model's name."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.path: Path | None = None
        self._vocab: llama_cpp.Llama | None = None
        self.template: ChatTemplate | None = None

    async def load(self) -> Path:
        """Find the model file and open its vocabulary (worker threads); the file's path.

        Raises `ModelLoadError`. If cancelled, the open in progress finishes in its
        thread and is dropped.
        """
        s = self._settings
        path = await trio.to_thread.run_sync(resolve_model_path, s.llm_model, s.model_cache_dir)
        vocab = await trio.to_thread.run_sync(_open_vocab, path)
        chat_format = s.chat_format or (EMBEDDED_CHAT_FORMAT if s.llm_model is None else None)
        self.template = ChatTemplate.select(
            chat_format,
            vocab.metadata,
            bos=_piece(vocab, vocab.token_bos()),
            eos=_piece(vocab, vocab.token_eos()),
        )
        self.path, self._vocab = path, vocab
        return path

    @property
    def name(self) -> str:
        s = self._settings
        if s.model_alias:
            return s.model_alias
        return EMBEDDED_ALIAS if s.llm_model is None else (self.path or Path("model")).stem

    async def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        vocab = self._vocab
        if vocab is None:
            raise EngineError("the model is not loaded")
        return await trio.to_thread.run_sync(
            partial(vocab.tokenize, text.encode("utf-8"), add_bos=add_bos, special=True)
        )

    def format_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        if self.template is None:
            raise EngineError("the model is not loaded")
        return self.template.render(messages)

    async def aclose(self) -> None:
        vocab, self._vocab = self._vocab, None
        if vocab is not None:
            await trio.to_thread.run_sync(vocab.close)


def _open_vocab(path: Path) -> llama_cpp.Llama:
    try:
        return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"LLM_MODEL: cannot load {path}: {exc}") from None


def _piece(vocab: llama_cpp.Llama, token: int) -> str:
    if token < 0:
        return ""
    return vocab.detokenize([token], special=True).decode("utf-8", errors="replace")
