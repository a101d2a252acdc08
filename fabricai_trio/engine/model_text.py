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

Bounded work (issue 17): llama.cpp's tokenizer is quadratic in the number of
user-defined tokens a text holds (Gemma's newline and tab runs, HTML tags: 32 kB of
short lines take seconds), so a text is never handed to it whole:

* With a `limit` (the room left in the context window), a text is first measured in
  bytes: no token of the vocabulary covers more than `max_token_bytes` bytes of text
  (the longest token piece, found at load), so a text of more than `limit *
  max_token_bytes` bytes certainly has more than `limit` tokens and is refused
  (`TooManyTokens`) without being tokenized at all.
* The rest is tokenized in pieces of at most `PIECE_CHARS` characters, each fast
  (about a millisecond, whatever the text), and tokenizing stops as soon as the count
  passes the limit. A piece ends, where it can, between two characters that no token
  of the vocabulary holds side by side (after a newline, before a space...): no token
  can span such a boundary, so for a SentencePiece vocabulary without a space prefix
  (Gemma) the pieces' tokens are exactly the whole text's. Where no such boundary is
  near, the piece is cut anyway (never inside a control or user-defined token); the
  tokens then differ from a whole tokenization only around that cut. Either way the
  tokens counted are the tokens the model is given.
* Pieces run in worker threads on a `CapacityLimiter` of their own
  (`TOKENIZE_THREADS`), one piece per thread call, so a cancelled request (its client
  left) stops between two pieces, and decoding never waits behind tokenizing: the
  decode steps run on threads of their own (`trio.lowlevel.start_thread_soon`), on no
  limiter.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp
import numpy as np
import trio

from ..core.engine import (
    ChatPrompt,
    EngineError,
    ModelLoadError,
    PromptPart,
    TokenMemo,
    TooManyTokens,
)
from ..core.errors import InvalidField
from ..core.messages import ChatMessage
from ..core.tools import ToolDefinition
from ..settings import Settings
from .chat import GGUF_TEMPLATE, ChatTemplate, select_template
from .grammar import grammar_error as llguidance_error
from .model_files import embedded_by_name, resolve_model_path

T = TypeVar("T")

# Only control tokens are split out of the template's text. User-defined tokens (Gemma's
# `<table>`, runs of newlines) are ordinary added text: llama.cpp matches them with
# special tokens off too, so they are left to the tokenizer, across part boundaries.
_CONTROL = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
_USER_DEFINED = llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
_BYTE = llama_cpp.LLAMA_TOKEN_ATTR_BYTE
_LSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP
_RSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
_SPLIT_CACHE_SIZE = 4096  # distinct template parts remembered (they repeat every turn)
PIECE_CHARS = 1024
"""Most characters llama.cpp tokenizes in one call: about a millisecond even for the
texts its tokenizer is slowest on (one short line after another), ~0.2 ms for prose."""
INLINE_TOKENIZE_CHARS = 512
"""Pieces up to this many characters are tokenized without a worker thread (at most
~0.5 ms, less than the worker-thread round trip for most texts)."""


def fallback_chat_format(llm_model: Path | str | None, architecture: str) -> str:
    """The format for a model whose GGUF has no chat template: the embedded model's
    own (`gemma` for Gemma 3 270M), `gemma` for other Gemma files, else `chatml`."""
    embedded = embedded_by_name(llm_model)
    if embedded is not None and embedded.fallback_chat_format is not None:
        return embedded.fallback_chat_format
    return "gemma" if architecture.startswith("gemma") else "chatml"


@dataclass(frozen=True, slots=True)
class VocabShape:
    """What bounded tokenization needs to know of a vocabulary (found once at load)."""

    max_token_bytes: int
    """The most bytes of text one token covers (0: unknown, no bound from size)."""
    pairs: frozenset[str]
    """Every two characters some token holds side by side: a piece boundary between
    two characters not in here splits no token."""
    special_pairs: frozenset[str]
    """The same for control and user-defined tokens only: a forced cut never falls
    inside one of them."""
    pieces: bool
    """Whether texts may be tokenized in pieces (not for a vocabulary that puts a space
    before each text it tokenizes, or one that normalizes text)."""


_SHAPES: dict[tuple[str, int, int], VocabShape] = {}  # per model file: the scan is ~0.5 s
_SHAPES_LOCK = threading.Lock()


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
        #: Held by each piece tokenized in a worker thread (TOKENIZE_THREADS).
        self.limiter = trio.CapacityLimiter(settings.tokenize_threads)
        self.pieces_tokenized = 0  # llama.cpp tokenize calls for prompts (tests, status)
        self.refused_by_size = 0  # texts refused from their size, never tokenized
        self._constraint_tokenizer: Any = None  # llguidance's (`constraint_tokenizer`)
        self._constraint_lock = trio.Lock()
        #: how long building `constraint_tokenizer()` took (status), None until built
        self.constraint_tokenizer_seconds: float | None = None

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

    def detokenize(self, tokens: Sequence[int]) -> str:
        """See `Detokenizer` (fast: the trio thread)."""
        if self._vocab is None:
            raise EngineError("the model is not loaded")
        return self._vocab.detokenize(tokens)

    def grammar_error(self, grammar: str) -> str | None:
        """Why `grammar` (llguidance's, engine/grammar.py) cannot constrain this model;
        see `GrammarChecker`. It is compiled without the model's tokens: no token is
        needed to tell whether a grammar is usable."""
        if self._vocab is None:
            return "the model is not loaded yet"
        return llguidance_error(grammar)

    async def constraint_tokenizer(self) -> Any:
        """llguidance's tokenizer over this vocabulary (`engine/constraint.py`), which
        constrained decoding needs: built once the model has loaded (CONSTRAINT_WARMUP,
        `prepare_grammars`) or else at the first constrained request, in a worker thread
        (~1-2 s for Gemma's 262k tokens, under 1 s for SmolLM2's 49k; never on the event
        loop nor in a decode step), then kept while the model is loaded. Requests
        that arrive meanwhile wait for the same build. Cancelled: the build finishes in
        its thread (`aclose()` waits for it) and is kept for the next request."""
        async with self._constraint_lock:
            if self._constraint_tokenizer is not None:
                return self._constraint_tokenizer
            vocab = self._loaded()
            start = time.perf_counter()
            tokenizer = await self._in_thread(vocab.constraint_tokenizer)
            if self._vocab is vocab:
                self._constraint_tokenizer = tokenizer
                self.constraint_tokenizer_seconds = time.perf_counter() - start
            if self._constraint_tokenizer is None:
                raise EngineError("the model is not loaded")
            return self._constraint_tokenizer

    @property
    def n_vocab(self) -> int | None:
        """Tokens in the vocabulary (token ids are below it); None until loaded."""
        return None if self._vocab is None else self._vocab.n_vocab

    @property
    def stop_tokens(self) -> frozenset[int]:
        """Tokens that end a chat reply: BOS, EOS, EOT and the template's end of turn."""
        return self._stop_tokens

    @property
    def shape(self) -> VocabShape:
        return self._loaded().shape

    def stats(self) -> dict[str, object]:
        """Tokenizer figures for `/v1/status` (`engine`)."""
        return {"tokenize_pieces": self.pieces_tokenized,
                "tokenize_refused_by_size": self.refused_by_size,
                "constraint_tokenizer_seconds": self.constraint_tokenizer_seconds}

    async def tokenize(
        self, text: str, *, add_bos: bool = True, limit: int | None = None
    ) -> list[int]:
        """Tokens of plain text; control tokens written in it are recognised (a raw
        prompt is the caller's own template). `limit`: see the module doc."""
        vocab = self._loaded()
        bos = add_bos and vocab.adds_bos and vocab.bos >= 0
        return await self._tokenize([text], bos=bos, special=True, limit=limit, memo=None)

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

    def format_chat_tools(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition]
    ) -> ChatPrompt | None:
        """Render tools, calls and tool results with the template's own tool format;
        None if it has none (see `ToolTemplates`). The template writes the tools and
        the calls' names and arguments itself, so a text in them that would be read
        as a control token is refused (`InvalidField`): it must not forge a turn.
        Raises `InvalidMessages` if the template refuses the conversation."""
        template = self.template
        if template is None:
            raise EngineError("the model is not loaded")
        if not template.tool_format:
            return None
        vocab = self._loaded()
        tool_list = [t.model_dump(exclude_none=True) for t in tools]
        _refuse_control_tokens(vocab, json.dumps(tool_list, ensure_ascii=False), "tools")
        items: list[dict[str, Any]] = []
        for index, m in enumerate(messages):
            item: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                calls = [{"id": c.id, "type": "function",
                          "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                         for c in m.tool_calls]
                _refuse_control_tokens(vocab, json.dumps(calls, ensure_ascii=False),
                                       f"messages.{index}.tool_calls")
                item["tool_calls"] = calls
            if m.tool_call_id is not None:
                _refuse_control_tokens(vocab, m.tool_call_id, f"messages.{index}.tool_call_id")
                item["tool_call_id"] = m.tool_call_id
            items.append(item)
        parts = template.render_items(items, tool_list or None)
        return ChatPrompt(
            text="".join(p.text for p in parts),
            parts=parts,
            stop=template.stop,
            stop_tokens=self._stop_tokens,
            add_bos=template.add_bos,
        )

    async def tokenize_chat(
        self, prompt: ChatPrompt, *, limit: int | None = None, memo: TokenMemo | None = None
    ) -> list[int]:
        """Tokens of a rendered chat (module doc); a prompt without parts is all
        template text. `memo`: stretches between control tokens already tokenized for
        this caller are taken from it, new ones added."""
        vocab = self._loaded()
        stretches = vocab.chat_stretches(prompt)
        bos = (prompt.add_bos and vocab.adds_bos and vocab.bos >= 0
               and stretches[:1] != [vocab.bos])
        return await self._tokenize(stretches, bos=bos, special=False, limit=limit, memo=memo)

    async def _tokenize(
        self,
        stretches: Sequence[str | int],
        *,
        bos: bool,
        special: bool,
        limit: int | None,
        memo: TokenMemo | None,
    ) -> list[int]:
        """Text stretches (and control token ids between them) as tokens, each stretch
        in pieces; `TooManyTokens` as soon as more than `limit` are certain."""
        vocab = self._loaded()
        shape = vocab.shape
        if limit is not None and shape.max_token_bytes:
            at_least = int(bos) + sum(
                1 if isinstance(s, int)
                else math.ceil(len(s.encode("utf-8", "surrogatepass")) / shape.max_token_bytes)
                for s in stretches
            )
            if at_least > limit:
                self.refused_by_size += 1
                await trio.lowlevel.checkpoint()
                raise TooManyTokens(at_least, exact=False)
        tokens: list[int] = [vocab.bos] if bos else []
        last = len(stretches) - 1
        for i, stretch in enumerate(stretches):
            if isinstance(stretch, int):
                tokens.append(stretch)
                continue
            known = memo.get(stretch) if memo is not None else None
            if known is not None:
                tokens += known
            else:
                start, done = len(tokens), 0
                for piece in iter_pieces(stretch, shape):
                    tokens += await self._piece(vocab, piece, special)
                    done += len(piece)
                    if (limit is not None and len(tokens) > limit
                            and (i < last or done < len(stretch))):
                        raise TooManyTokens(len(tokens), exact=False)
                if memo is not None:
                    memo.put(stretch, tokens[start:])
            if limit is not None and len(tokens) > limit and i < last:
                raise TooManyTokens(len(tokens), exact=False)
        if limit is not None and len(tokens) > limit:
            raise TooManyTokens(len(tokens), exact=True)
        await trio.lowlevel.checkpoint()  # even when every stretch came from the memo
        return tokens

    async def _piece(self, vocab: _Vocab, piece: str, special: bool) -> list[int]:
        """One piece: inline if short, else in a worker thread on the tokenizer's own
        limiter (never abandoned, counted so that `aclose()` waits for it). A
        checkpoint either way, so a cancelled caller stops here."""
        if len(piece) <= INLINE_TOKENIZE_CHARS:
            await trio.lowlevel.checkpoint()
            if self._vocab is not vocab:  # aclose ran during the checkpoint
                raise EngineError("the model is not loaded")
            self.pieces_tokenized += 1
            return vocab.tokenize(piece, add_bos=False, special=special)
        # No checkpoint from this check to the count `aclose()` waits on: it cannot free
        # the vocabulary under this thread.
        if self._vocab is not vocab:
            raise EngineError("the model is not loaded")
        tokens = await self._in_thread(
            lambda: vocab.tokenize(piece, add_bos=False, special=special), limiter=self.limiter)
        self.pieces_tokenized += 1
        return tokens

    async def _in_thread(self, fn: Callable[[], T],
                         limiter: trio.CapacityLimiter | None = None) -> T:
        """`fn()` (which reads the vocabulary) in a worker thread, counted so that
        `aclose()` frees the vocabulary only after it has returned. Cancelled: it
        finishes in its thread first (never abandoned)."""
        self._in_threads += 1
        try:
            return await trio.to_thread.run_sync(fn, limiter=limiter)
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
        self._constraint_tokenizer = None  # it reads the vocabulary
        if vocab is not None:
            await trio.to_thread.run_sync(vocab.close)


def _arguments(text: str) -> Any:
    """A call's arguments as templates expect them (an object), or the client's text
    as it is if it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _refuse_control_tokens(vocab: _Vocab, text: str, param: str) -> None:
    if any(isinstance(piece, int) for piece in vocab.split_specials(text)):
        raise InvalidField(param, "holds the text of one of the model's control tokens")


def split_pieces(text: str, shape: VocabShape, size: int = PIECE_CHARS) -> list[str]:
    """`text` in pieces of at most `size` characters (and at least half that, but for
    the last), each ending where no token can span (module doc) if such a place is in
    its second half, else where no control or user-defined token is cut."""
    return list(iter_pieces(text, shape, size))


def iter_pieces(text: str, shape: VocabShape, size: int = PIECE_CHARS) -> Iterator[str]:
    """`split_pieces`, one at a time: a caller that stops early splits no further."""
    if len(text) <= size or not shape.pieces:
        yield text
        return
    start, n = 0, len(text)
    pairs, special = shape.pairs, shape.special_pairs
    while n - start > size:
        hi, lo = start + size, start + size // 2
        cut = next((p for p in range(hi, lo, -1) if text[p - 1:p + 1] not in pairs), 0)
        if not cut:
            cut = next((p for p in range(hi, lo, -1) if text[p - 1:p + 1] not in special), hi)
        yield text[start:cut]
        start = cut
    yield text[start:]


class _Vocab:
    """A vocab-only llama.cpp model plus what chat tokenization needs. Thread-safe:
    llama.cpp's tokenizer is read-only; the split cache has a lock."""

    def __init__(self, llama: llama_cpp.Llama, shape: VocabShape) -> None:
        self._llama = llama
        self._vocab = llama._model.vocab
        self.metadata: dict[str, str] = dict(llama.metadata)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.eot = int(llama_cpp.llama_vocab_eot(self._vocab))
        self.adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.shape = shape
        self._splits: dict[str, tuple[str | int, ...]] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> _Vocab:
        try:
            llama = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"LLM_MODEL: cannot load {path}: {exc}") from None
        return cls(llama, _shape_of(path, llama))

    def close(self) -> None:
        self._llama.close()

    def constraint_tokenizer(self) -> Any:
        """llguidance's tokenizer over this vocabulary (blocking)."""
        from .constraint import constraint_tokenizer

        return constraint_tokenizer(self._vocab)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._llama.detokenize(list(tokens), special=True).decode(
            "utf-8", errors="replace")

    def piece(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llama.detokenize([token], special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        # A lone surrogate (valid JSON, not valid UTF-8) is tokenized as U+FFFD.
        return self._llama.tokenize(text.encode("utf-8", "replace"), add_bos=add_bos,
                                    special=special)

    def chat_stretches(self, prompt: ChatPrompt) -> list[str | int]:
        """The text between control tokens (each stretch tokenized with special tokens
        off) and the control token ids, as `tokenize_chat` feeds them."""
        out: list[str | int] = []
        pending: list[str] = []  # text since the last control token

        def flush() -> None:
            if pending:
                out.append("".join(pending))
                pending.clear()

        for part in prompt.parts or (PromptPart(prompt.text, template=True),):
            if not part.template:
                pending.append(part.text)
                continue
            for piece in self.split_specials(part.text):
                if isinstance(piece, int):
                    flush()
                    out.append(piece)
                else:
                    pending.append(piece)
        flush()
        return out

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


def _shape_of(path: Path, llama: llama_cpp.Llama) -> VocabShape:
    """Scan the vocabulary once per model file (module doc): the longest token in
    bytes, and which characters tokens hold side by side."""
    stat = os.stat(path)
    key = (str(path), stat.st_size, int(stat.st_mtime_ns))
    with _SHAPES_LOCK:
        known = _SHAPES.get(key)
    if known is not None:
        return known
    vocab = llama._model.vocab
    kind = int(llama_cpp.llama_vocab_type(vocab))
    attrs = [int(llama_cpp.llama_vocab_get_attr(vocab, t))
             for t in range(int(llama_cpp.llama_vocab_n_tokens(vocab)))]
    pieces = _token_pieces(vocab, attrs, spm=kind == llama_cpp.LLAMA_VOCAB_TYPE_SPM)
    special = [p for p, a in zip(pieces, attrs, strict=True) if a & (_CONTROL | _USER_DEFINED)]
    space_prefix = llama.metadata.get("tokenizer.ggml.add_space_prefix", "true") != "false"
    # A token covers at most its piece's bytes, so the longest piece bounds the bytes per
    # token for vocabularies that do not normalize the text (SentencePiece's space prefix
    # only adds a byte); a UTF-8 character is at most 4 bytes (an unknown one is 1 token).
    bounded = kind in (llama_cpp.LLAMA_VOCAB_TYPE_BPE, llama_cpp.LLAMA_VOCAB_TYPE_SPM)
    shape = VocabShape(
        max_token_bytes=max(4, *map(len, pieces)) if bounded else 0,
        pairs=_pairs(pieces),
        special_pairs=_pairs(special),
        pieces=kind == llama_cpp.LLAMA_VOCAB_TYPE_BPE or (
            kind == llama_cpp.LLAMA_VOCAB_TYPE_SPM and not space_prefix),
    )
    with _SHAPES_LOCK:
        _SHAPES[key] = shape
    return shape


def _token_pieces(vocab: object, attrs: Sequence[int], *, spm: bool) -> list[bytes]:
    """Every token's text as it appears in a text (control tokens as written). For
    SentencePiece from the vocabulary's own strings (5x faster than asking llama.cpp
    for each piece): spaces are written `▁` there, byte tokens `<0xNN>`."""
    n_vocab = len(attrs)
    out: list[bytes] = []
    if spm:
        space = "\u2581".encode()
        for token in range(n_vocab):
            raw = llama_cpp.llama_vocab_get_text(vocab, token) or b""
            if attrs[token] & _BYTE:
                out.append(bytes([int(raw[3:5], 16)]) if len(raw) == 6 else raw)
            else:
                out.append(raw.replace(space, b" "))
        return out
    buf = ctypes.create_string_buffer(512)
    for token in range(n_vocab):
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        out.append(buf.raw[:max(n, 0)])
    return out


def _pairs(pieces: Sequence[bytes]) -> frozenset[str]:
    """Every two characters that some piece holds side by side (numpy: ~2M characters)."""
    text = b"\0".join(pieces).decode("utf-8", "replace")  # NUL ends any broken sequence
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < 2:
        return frozenset()
    left, right = codes[:-1], codes[1:]
    keep = (left != 0) & (right != 0)  # not across the joins
    both = np.unique((left[keep] << np.uint64(21)) | right[keep]).tolist()
    mask = (1 << 21) - 1
    return frozenset(chr(c >> 21) + chr(c & mask) for c in both)


class ModelTextMethods:
    """The text side of the `Engine` protocol (and of `GrammarChecker`, `GrammarPreparer`,
    `Detokenizer`) for an engine whose tokenizer and chat template are a `ModelText`:
    both built-in engines. Cancellation as in `ModelText`: a tokenization stops between
    two pieces."""

    _text: ModelText

    def grammar_error(self, grammar: str) -> str | None:
        return self._text.grammar_error(grammar)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._text.detokenize(tokens)

    async def tokenize(
        self, text: str, *, add_bos: bool = True, limit: int | None = None
    ) -> list[int]:
        return await self._text.tokenize(text, add_bos=add_bos, limit=limit)

    async def prepare_grammars(self) -> None:
        """`GrammarPreparer`: build `ModelText.constraint_tokenizer()` now."""
        await self._text.constraint_tokenizer()

    def format_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        return self._text.format_chat(messages)

    def format_chat_tools(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolDefinition]
    ) -> ChatPrompt | None:
        return self._text.format_chat_tools(messages, tools)

    async def tokenize_chat(
        self, prompt: ChatPrompt, *, limit: int | None = None, memo: TokenMemo | None = None
    ) -> list[int]:
        return await self._text.tokenize_chat(prompt, limit=limit, memo=memo)
