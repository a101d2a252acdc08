"""A complete, tiny engine for docs/hacking.md: it "generates" the prompt back, word by word.

Load it with `ENGINE=examples.echo_engine:EchoEngine fabricai-trio serve` (from the
repository root). It shows everything an engine must do: tokenize, render chat,
stream `Chunk`s then one `Finish`, and respect cancellation (each step is a checkpoint).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import trio

from fabricai_trio.core.engine import (
    ChatPrompt,
    Chunk,
    EngineInfo,
    EngineRequest,
    Finish,
    TokenMemo,
    check_limit,
)
from fabricai_trio.core.messages import ChatMessage
from fabricai_trio.core.textstream import StopMatcher
from fabricai_trio.settings import Settings


class EchoEngine:
    """Words are tokens; the output is the prompt's words, `delay_seconds` apart."""

    delay_seconds = 0.005

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loaded = False
        self._generated = 0
        self._words: dict[int, str] = {}
        self._ids: dict[str, int] = {}

    async def load(self) -> None:
        await trio.lowlevel.checkpoint()
        self._loaded = True

    def info(self) -> EngineInfo:
        return EngineInfo(
            model="echo", model_path=None, n_ctx=self._settings.n_ctx,
            slots=self._settings.max_concurrent_requests, chat_format="echo",
            loaded=self._loaded, tokens_generated=self._generated,
        )

    async def tokenize(
        self, text: str, *, add_bos: bool = True, limit: int | None = None
    ) -> list[int]:
        await trio.lowlevel.checkpoint()
        # `limit`: more tokens than that raise TooManyTokens (a 400 context_length_exceeded).
        return check_limit([self._ids.setdefault(w, len(self._ids)) for w in text.split()],
                           limit)

    def format_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        return ChatPrompt(text=messages[-1].content if messages else "")

    async def tokenize_chat(
        self, prompt: ChatPrompt, *, limit: int | None = None, memo: TokenMemo | None = None
    ) -> list[int]:
        return await self.tokenize(prompt.text, limit=limit)

    async def generate_stream(self, request: EngineRequest) -> AsyncGenerator[Chunk | Finish, None]:
        words = {v: k for k, v in self._ids.items()}
        stops = StopMatcher(request.stop)
        for produced, token in enumerate(request.prompt_tokens[: request.max_tokens], 1):
            await trio.sleep(self.delay_seconds)  # a cancellation lands here, between tokens
            self._generated += 1
            text = stops.feed(f" {words[token]}" if produced > 1 else words[token])
            yield Chunk(text)
            if stops.stopped:
                yield Finish("stop", produced)
                return
        yield Chunk(stops.flush(), 0)
        reason = "length" if len(request.prompt_tokens) >= request.max_tokens else "stop"
        yield Finish(reason, min(len(request.prompt_tokens), request.max_tokens))

    async def aclose(self) -> None:
        self._loaded = False
