"""A fake engine: a test double for concurrency tests only (never a feature).

It speaks the `Engine` protocol with words as tokens and one `trio.sleep` per token,
so tests under `trio.testing.MockClock` are deterministic.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import trio
import trio.lowlevel

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
from fabricai_trio.settings import Settings

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


class FakeEngine:
    """Emits WORDS cyclically, `step_seconds` per token, over `slots` fake contexts."""

    def __init__(self, settings: Settings, *, step_seconds: float = 0.01) -> None:
        self.settings = settings
        self.step_seconds = step_seconds
        self.loaded = False
        self.tokens_generated = 0
        self.in_use = 0
        self.max_in_use = 0
        self.started: list[str] = []

    async def load(self) -> None:
        await trio.lowlevel.checkpoint()
        self.loaded = True

    def info(self) -> EngineInfo:
        return EngineInfo(
            model="fake", model_path=None, n_ctx=self.settings.n_ctx,
            slots=self.settings.max_concurrent_requests, chat_format="fake",
            loaded=self.loaded, tokens_generated=self.tokens_generated,
        )

    async def tokenize(
        self, text: str, *, add_bos: bool = True, limit: int | None = None
    ) -> list[int]:
        await trio.lowlevel.checkpoint()
        return check_limit([0] * (len(text.split()) + int(add_bos)), limit)

    def format_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        text = "".join(f"<{m.role}> {m.content} " for m in messages) + "<assistant>"
        return ChatPrompt(text=text, stop=("<end>",))

    async def tokenize_chat(
        self, prompt: ChatPrompt, *, limit: int | None = None, memo: TokenMemo | None = None
    ) -> list[int]:
        return await self.tokenize(prompt.text, add_bos=prompt.add_bos, limit=limit)

    async def generate_stream(self, request: EngineRequest) -> AsyncGenerator[Chunk | Finish, None]:
        self.started.append(request.request_id)
        self.in_use += 1
        self.max_in_use = max(self.max_in_use, self.in_use)
        try:
            for i in range(request.max_tokens):
                await trio.sleep(self.step_seconds)
                self.tokens_generated += 1
                yield Chunk(f" {WORDS[i % len(WORDS)]}", 1)
            yield Finish("length", request.max_tokens)
        finally:
            self.in_use -= 1

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
