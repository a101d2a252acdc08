"""The text side of a llama.cpp model, shared by the engines: which file, its tokenizer,
its chat template and the name the API reports.

Tokenizing uses a vocab-only `llama_cpp.Llama` (no weights, no context), so it never
touches a context a generation holds and can run in any worker thread. Short texts are
tokenized in the trio thread: tens of microseconds, less than the worker-thread round
trip they would otherwise add to the time to first token.

Chat prompts (`tokenize_chat`) are tokenized the way llama.cpp tokenizes a whole
rendered prompt with special tokens on (it splits the text at control tokens, then
tokenizes each stretch of text in between), except that control tokens are looked
for only in the parts the template wrote: a message that contains `<|im_start|>`
gets the tokens of that text, not the control token.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import llama_cpp
import trio

from ..core.engine import ChatPrompt, EngineError, ModelLoadError, PromptPart
from ..core.messages import ChatMessage
from ..settings import Settings
from .chat import GGUF_TEMPLATE, ChatTemplate, select_template
from .model_files import embedded_by_name, resolve_model_path

# Only control tokens are split out of the template's text. User-defined tokens (Gemma's
# `<table>`, runs of newlines) are ordinary added text: llama.cpp matches them with
# special tokens off too, so they are left to the tokenizer, across part boundaries.
_CONTROL = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
_LSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP
_RSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
_SPLIT_CACHE_SIZE = 4096  # distinct template parts remembered (they repeat every turn)
INLINE_TOKENIZE_CHARS = 2048
"""Texts up to this many characters are tokenized without a worker thread (~0.1 ms)."""


def fallback_chat_format(llm_model: Path | str | None, architecture: str) -> str:
    """The format for a model whose GGUF has no chat template: the embedded model's
    own (`gemma` for Gemma 3 270M), `gemma` for other Gemma files, else `chatml`."""
    embedded = embedded_by_name(llm_model)
    if embedded is not None and embedded.fallback_chat_format is not None:
        return embedded.fallback_chat_format
    return "gemma" if architecture.startswith("gemma") else "chatml"


class ModelText:
    """`load()` it, then ask for tokens, chat prompts and the model's name."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.path: Path | None = None
        self._vocab: _Vocab | None = None
        self.template: ChatTemplate | None = None
        self._stop_tokens: frozenset[int] = frozenset()
        self._in_threads = 0  # tokenize calls running in worker threads
        self._idle = trio.Event()

    async def load(self) -> Path:
        """Find the model file and open its vocabulary (worker threads); the file's path.

        Raises `ModelLoadError`. If cancelled, the open in progress finishes in its
        thread and is dropped.
        """
        s = self._settings
        path = await trio.to_thread.run_sync(resolve_model_path, s.llm_model, s.model_cache_dir)
        vocab = await trio.to_thread.run_sync(_Vocab.open, path)
        try:
            template = select_template(
                s.chat_format,
                vocab.metadata,
                bos=vocab.piece(vocab.bos),
                eos=vocab.piece(vocab.eos),
                fallback=fallback_chat_format(
                    s.llm_model, vocab.metadata.get("general.architecture", "")
                ),
            )
            end_of_turn = [t for t in vocab.split_specials(template.end_of_turn())
                           if isinstance(t, int)]
        except BaseException:
            await trio.to_thread.run_sync(vocab.close)
            raise
        self._stop_tokens = frozenset(
            t for t in (vocab.bos, vocab.eos, vocab.eot, *end_of_turn[:1]) if t >= 0
        )
        self.template, self.path, self._vocab = template, path, vocab
        return path

    @property
    def name(self) -> str:
        s = self._settings
        if s.model_alias:
            return s.model_alias
        embedded = embedded_by_name(s.llm_model)
        if embedded is not None:
            return embedded.name
        return (self.path or Path(s.llm_model or "model")).stem

    @property
    def template_source(self) -> str | None:
        """`chat_format` (CHAT_FORMAT), `gguf` (the file's template) or `fallback`."""
        if self.template is None:
            return None
        if self._settings.chat_format is not None:
            return "chat_format"
        return "gguf" if self.template.name == GGUF_TEMPLATE else "fallback"

    def grammar_error(self, grammar: str) -> str | None:
        """Why `grammar` (GBNF) cannot constrain this model; see `GrammarChecker`."""
        if self._vocab is None:
            return "the model is not loaded yet"
        return self._vocab.grammar_error(grammar)

    @property
    def n_vocab(self) -> int | None:
        """Tokens in the vocabulary (token ids are below it); None until loaded."""
        return None if self._vocab is None else self._vocab.n_vocab

    @property
    def stop_tokens(self) -> frozenset[int]:
        """Tokens that end a chat reply: BOS, EOS, EOT and the template's end of turn."""
        return self._stop_tokens

    async def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Tokens of plain text; control tokens written in it are recognised (a raw
        prompt is the caller's own template)."""
        return await self._run(len(text), lambda vocab: vocab.tokenize(
            text, add_bos=add_bos, special=True))

    def format_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        """Render with the chat template. Raises `InvalidMessages`."""
        if self.template is None:
            raise EngineError("the model is not loaded")
        parts = self.template.render(messages)
        return ChatPrompt(
            text="".join(p.text for p in parts),
            parts=parts,
            stop=self.template.stop,
            stop_tokens=self._stop_tokens,
            add_bos=self.template.add_bos,
        )

    async def tokenize_chat(self, prompt: ChatPrompt) -> list[int]:
        """Tokens of a rendered chat (module doc); a prompt without parts is all
        template text."""
        return await self._run(len(prompt.text), lambda vocab: vocab.tokenize_chat(prompt))

    async def _run(self, chars: int, fn: Callable[[_Vocab], list[int]]) -> list[int]:
        """`fn(vocab)` inline for short texts, else in a worker thread (never abandoned,
        counted so that `aclose()` waits for it)."""
        inline = chars <= INLINE_TOKENIZE_CHARS
        if inline:
            await trio.lowlevel.checkpoint()  # before looking at _vocab: aclose may run here
        vocab = self._loaded()
        if inline:
            return fn(vocab)
        self._in_threads += 1
        try:
            return await trio.to_thread.run_sync(fn, vocab)
        finally:
            self._in_threads -= 1
            if not self._in_threads:
                self._idle.set()
                self._idle = trio.Event()

    def _loaded(self) -> _Vocab:
        if self._vocab is None:
            raise EngineError("the model is not loaded")
        return self._vocab

    async def aclose(self) -> None:
        """Free the tokenizer once the tokenize calls in worker threads have returned."""
        while self._in_threads:
            await self._idle.wait()
        vocab, self._vocab = self._vocab, None
        if vocab is not None:
            await trio.to_thread.run_sync(vocab.close)


class _Vocab:
    """A vocab-only llama.cpp model plus what chat tokenization needs. Thread-safe:
    llama.cpp's tokenizer is read-only; the split cache has a lock."""

    def __init__(self, llama: llama_cpp.Llama) -> None:
        self._llama = llama
        self._vocab = llama._model.vocab
        self.metadata: dict[str, str] = dict(llama.metadata)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.eot = int(llama_cpp.llama_vocab_eot(self._vocab))
        self._adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._splits: dict[str, tuple[str | int, ...]] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> _Vocab:
        try:
            llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"LLM_MODEL: cannot load {path}: {exc}") from None
        return cls(llama)

    def close(self) -> None:
        self._llama.close()

    def grammar_error(self, grammar: str) -> str | None:
        """llama.cpp's own grammar parser, run on this vocabulary (a grammar sampler is
        built and freed): None if `grammar` is usable."""
        sampler = llama_cpp.llama_sampler_init_grammar(
            self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            return "the grammar does not parse, or has no `root` rule (GBNF, llama.cpp)"
        llama_cpp.llama_sampler_free(sampler)
        return None

    def piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llama.detokenize([token], special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def tokenize_chat(self, prompt: ChatPrompt) -> list[int]:
        tokens: list[int] = []
        pending: list[str] = []  # text since the last control token

        def flush() -> None:
            if pending:
                tokens.extend(self.tokenize("".join(pending), add_bos=False, special=False))
                pending.clear()

        for part in prompt.parts or (PromptPart(prompt.text, template=True),):
            if not part.template:
                pending.append(part.text)
                continue
            for piece in self.split_specials(part.text):
                if isinstance(piece, int):
                    flush()
                    tokens.append(piece)
                else:
                    pending.append(piece)
        flush()
        if prompt.add_bos and self._adds_bos and self.bos >= 0 and tokens[:1] != [self.bos]:
            tokens.insert(0, self.bos)
        return tokens

    def split_specials(self, text: str) -> tuple[str | int, ...]:
        """`text` as text runs and control-token ids, split as llama.cpp's tokenizer
        splits it (longest token first; a token's LSTRIP/RSTRIP eat the whitespace
        next to it). Which control tokens occur is asked of llama.cpp itself: the
        tokens of `text` with special tokens on."""
        with self._lock:
            cached = self._splits.get(text)
        if cached is not None:
            return cached
        found: dict[int, tuple[str, int]] = {}
        for token in self.tokenize(text, add_bos=False, special=True):
            attr = int(llama_cpp.llama_vocab_get_attr(self._vocab, token))
            if attr & _CONTROL and token not in found:
                raw = llama_cpp.llama_vocab_get_text(self._vocab, token)
                found[token] = (raw.decode("utf-8", errors="replace"), attr)
        pieces: list[str | int] = [text]
        for token, (special, attr) in sorted(found.items(), key=lambda kv: -len(kv[1][0])):
            if not special:
                continue
            out: list[str | int] = []
            for piece in pieces:
                if isinstance(piece, int):
                    out.append(piece)
                    continue
                chunks = piece.split(special)
                for i, chunk in enumerate(chunks):
                    if i > 0 and attr & _RSTRIP:
                        chunk = chunk.lstrip()
                    if i < len(chunks) - 1 and attr & _LSTRIP:
                        chunk = chunk.rstrip()
                    if chunk:
                        out.append(chunk)
                    if i < len(chunks) - 1:
                        out.append(token)
            pieces = out
        result = tuple(pieces)
        with self._lock:
            if len(self._splits) >= _SPLIT_CACHE_SIZE:
                self._splits.clear()
            self._splits[text] = result
        return result
