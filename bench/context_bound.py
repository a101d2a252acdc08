"""What a prompt too long for the context costs the server (issue 17, item 1).

    nice -n 5 .venv/bin/python bench/context_bound.py [--n-ctx 4096] [--max-tokens 256]
        [--no-stream | --stream-only]

Three figures, on the embedded Gemma model, in this process:

1. Refusing a newline-heavy prompt (`"a\\n" * n`, what llama.cpp's tokenizer is
   quadratic on): before, the whole text in one tokenizer call (what the server did);
   after, `ModelText.tokenize(limit=...)` (size bound, then ~1 KB pieces up to the
   budget). The "before" column stops at 64 kB (1 MiB would take hours).
2. Trimming a session of 100/200/400 turns: before, one turn dropped at a time and the
   whole conversation tokenized again each time (the old loop, reproduced here); after,
   `GenerationService._prompt_tokens` (binary search, one `TokenMemo`).
3. A running stream's tokens/s alone, and while 3 clients send too-long prompts back to
   back (40 kB newline-heavy ones, which take the piece path, and 1 MiB ones), through a
   real Hypercorn on a loopback socket. Needs a quiet machine: on a shared one the
   stream's speed moves more with the other jobs than with the refusals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from fabricai_trio.admission import Admission
from fabricai_trio.core.engine import TooManyTokens
from fabricai_trio.core.messages import ChatMessage
from fabricai_trio.core.requests import GenerationRequest
from fabricai_trio.engine.model_text import ModelText
from fabricai_trio.generation import GenerationService
from fabricai_trio.sessions import MemorySessionStore, Message, Session
from fabricai_trio.settings import Settings


def lines(n_bytes: int) -> str:
    return "a\n" * (n_bytes // 2)


async def refusals(text: ModelText, budget: int) -> None:
    vocab = text._loaded()
    print(f"\n1. Refusing `a\\n` * n (budget {budget} tokens)")
    print("| prompt | before: one tokenizer call | after: refused | after: tokenizer calls |")
    print("| ---: | ---: | ---: | ---: |")
    for kib in (16, 32, 64, 128, 1024):
        prompt = lines(kib * 1024)
        before = "—"
        if kib <= 64:
            t0 = time.perf_counter()
            vocab.tokenize(prompt, add_bos=True, special=True)
            before = f"{time.perf_counter() - t0:.2f} s"
        pieces = text.pieces_tokenized
        t0 = time.perf_counter()
        with contextlib.suppress(TooManyTokens):
            await text.tokenize(prompt, limit=budget)
        after = time.perf_counter() - t0
        print(f"| {kib} KiB | {before} | {after * 1000:.1f} ms | "
              f"{text.pieces_tokenized - pieces} |")


class _TextEngine:
    """Just enough of an engine for `_prompt_tokens`: the model's text side."""

    def __init__(self, text: ModelText) -> None:
        self.format_chat = text.format_chat
        self.tokenize_chat = text.tokenize_chat
        self.tokenize = text.tokenize


def history(turns: int) -> tuple[Message, ...]:
    out = [Message(role="system", content="Be terse.")]
    for i in range(turns):
        out += [Message(role="user", content=f"Turn {i}. " + "The quick brown fox. " * 8),
                Message(role="assistant", content=f"Reply {i}: the lazy dog sleeps.")]
    return tuple(out)


async def old_trim(text: ModelText, messages: tuple[Message, ...], new: ChatMessage,
                   budget: int) -> int:
    """The loop the server had: drop the oldest turn, render and tokenize it all again."""
    system = [ChatMessage(role=m.role, content=m.content) for m in messages
              if m.role == "system"]
    older = [ChatMessage(role=m.role, content=m.content) for m in messages
             if m.role != "system"]
    while True:
        chat = text.format_chat([*system, *older, new])
        tokens = await text.tokenize_chat(chat)
        if len(tokens) <= budget or not older:
            return len(tokens)
        end = 1
        while end < len(older) and older[end].role != "user":
            end += 1
        older = older[end:]


async def trimming(text: ModelText, settings: Settings, max_tokens: int) -> None:
    budget = settings.n_ctx - max_tokens
    service = GenerationService(
        settings=settings, engine=_TextEngine(text),  # type: ignore[arg-type]
        admission=Admission(max_concurrent=1, max_queue=1),
        store=MemorySessionStore(ttl_seconds=60),
    )
    print(f"\n2. Trimming a session to {budget} tokens")
    print("| turns | before | before: tokenizer calls | after | after: tokenizer calls | dropped |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for turns in (100, 200, 400):
        messages = history(turns)
        session = Session(id="s", owner="o", created_at=0, updated_at=0, messages=messages)
        new = ChatMessage(role="user", content="And now?")
        request = GenerationRequest(prompt="And now?", session_id="s", max_tokens=max_tokens)
        before = "—"
        calls_before = "—"
        if turns <= 200:
            pieces = text.pieces_tokenized
            t0 = time.perf_counter()
            await old_trim(text, messages, new, budget)
            before = f"{time.perf_counter() - t0:.2f} s"
            calls_before = str(text.pieces_tokenized - pieces)
        pieces = text.pieces_tokenized
        t0 = time.perf_counter()
        prompt = await service._prompt_tokens(request, session, [new], max_tokens)
        after = time.perf_counter() - t0
        print(f"| {turns} | {before} | {calls_before} | {after * 1000:.0f} ms | "
              f"{text.pieces_tokenized - pieces} | {prompt.dropped_messages} |")


async def stream_rate(settings: Settings) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from fabricai_trio.app import create_app

    app = create_app(settings)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    print("\n3. One stream's tokens/s (128 tokens, temperature 0), median of 3 rounds; "
          "the cases alternate within each round")
    print("| while | tok/s | ratio to alone | refusals answered |")
    print("| --- | ---: | ---: | ---: |")
    cases = (("nothing else", None),
             ("3 clients send 40 kB `a\\n` prompts", lines(40_000)),
             ("3 clients send 1 MiB `a\\n` prompts", lines(700_000)))
    rates: dict[str, list[float]] = {label: [] for label, _ in cases}
    refused: dict[str, int] = dict.fromkeys(rates, 0)
    async with trio.open_nursery() as nursery:
        asgi: Any = app
        binds = await nursery.start(partial(serve, asgi, config, shutdown_trigger=stop.wait))
        async with httpx.AsyncClient(base_url=binds[0], timeout=600) as client:
            await app.ready.wait()
            await one_stream(client, None)  # warm-up
            for _ in range(3):
                for label, body in cases:
                    rate, count = await one_stream(client, body)
                    rates[label].append(rate)
                    refused[label] += count
        alone = statistics.median(rates[cases[0][0]])
        for label, _ in cases:
            rate = statistics.median(rates[label])
            print(f"| {label} | {rate:.1f} | {rate / alone:.2f} | {refused[label]} |")
        stop.set()


async def one_stream(client: httpx.AsyncClient, prompt: str | None) -> tuple[float, int]:
    done = trio.Event()
    refused = 0

    async def refuse() -> None:
        nonlocal refused
        content = json.dumps({"prompt": prompt, "max_tokens": 256})
        while not done.is_set():
            response = await client.post("/v1/inference_sse", content=content,
                                         headers={"content-type": "application/json"})
            assert response.status_code == 400, response.text
            refused += 1

    async with trio.open_nursery() as nursery:
        if prompt is not None:
            for _ in range(3):
                nursery.start_soon(refuse)
            await trio.sleep(0.5)
        response = await client.post("/v1/inference_sse", json={
            "prompt": "Once upon a time", "max_tokens": 128, "temperature": 0})
        done.set()
    complete = next(json.loads(line[6:]) for line in response.text.splitlines()
                if line.startswith("data: ") and '"timings"' in line)
    return float(complete["timings"]["tokens_per_second"] or 0.0), refused


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--no-stream", action="store_true", help="skip figure 3")
    parser.add_argument("--stream-only", action="store_true", help="only figure 3")
    args = parser.parse_args()
    settings = Settings(  # type: ignore[call-arg]
        n_ctx=args.n_ctx, chat_format="gemma", session_store="memory",
        max_body_bytes=2 << 20, max_concurrent_requests=4, max_queue_size=8,
    )
    if not args.stream_only:
        text = ModelText(settings)
        await text.load()
        try:
            await refusals(text, settings.n_ctx - args.max_tokens)
            await trimming(text, settings, args.max_tokens)
        finally:
            await text.aclose()
    if not args.no_stream:
        await stream_rate(settings)


if __name__ == "__main__":
    trio.run(main)
