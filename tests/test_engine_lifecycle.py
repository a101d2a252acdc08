"""Both built-in engines: the capacity they report, no queue of their own, and an
`aclose()` that waits for the decode step in flight before freeing any llama.cpp state.

The step is held in its worker thread by a gate (a `threading.Event`), so "aclose waits"
is asserted by order of events, not by timing.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fabricai_trio.core.engine import Chunk, Engine, EngineError, EngineRequest, Finish
from fabricai_trio.engine import llama as llama_module
from fabricai_trio.engine.batched import BatchedEngine
from fabricai_trio.engine.llama import LlamaEngine
from fabricai_trio.settings import Settings

ENGINES: dict[str, Callable[[Settings], Engine]] = {"batched": BatchedEngine,
                                                    "llama": LlamaEngine}


def settings(model_path: Path | None, slots: int) -> Settings:
    return Settings(llm_model=model_path, chat_format="gemma", max_concurrent_requests=slots,
                    prefix_cache_sequences=0, n_ctx=512, n_threads=1)


def request(tokens: list[int], max_tokens: int = 8) -> EngineRequest:
    return EngineRequest(request_id="t", prompt_tokens=tokens, max_tokens=max_tokens,
                         temperature=0.0)


@pytest.mark.parametrize("name", ENGINES)
def test_capacity_is_reported_before_load(name: str, tmp_path: Path) -> None:
    """Admission is sized from `info().slots`: it must be right before the model loads
    (settings-derived), even if the model never loads."""
    engine = ENGINES[name](settings(tmp_path / "missing.gguf", 3))
    info = engine.info()
    assert info.slots == 3 and not info.loaded


@pytest.mark.model
@pytest.mark.parametrize("name", ENGINES)
async def test_a_stream_beyond_capacity_is_refused_not_queued(name: str, model_path: Path
                                                              ) -> None:
    engine = ENGINES[name](settings(model_path, 1))
    await engine.load()
    try:
        prompt = await engine.tokenize("Once upon a time")
        async with aclosing(engine.generate_stream(request(prompt, 4))) as first:
            assert isinstance(await first.__anext__(), Chunk)
            async with aclosing(engine.generate_stream(request(prompt, 4))) as second:
                with pytest.raises(EngineError, match="admission"):
                    await second.__anext__()
            items = [item async for item in first]
            assert isinstance(items[-1], Finish)
        # The slot is free again once the first stream closed.
        async with aclosing(engine.generate_stream(request(prompt, 2))) as third:
            assert isinstance([item async for item in third][-1], Finish)
    finally:
        await engine.aclose()


class Gate:
    """Holds decode steps in their worker thread until `open()`; records events."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self._entered = threading.Event()
        self._open = threading.Event()

    def wrap(self, step: Callable[..., Any]) -> Callable[..., Any]:
        def gated(*args: Any, **kwargs: Any) -> Any:
            self._entered.set()
            self._open.wait(timeout=60)
            try:
                return step(*args, **kwargs)
            finally:
                self.events.append("step returned")
        return gated

    def closing(self, close: Callable[[], None], what: str) -> Callable[[], None]:
        def recorded() -> None:
            self.events.append(f"close {what}")
            close()
        return recorded

    async def entered(self) -> None:
        await trio.to_thread.run_sync(self._entered.wait, 60)

    def open(self) -> None:
        self._open.set()


def gate_engine(name: str, engine: Any, gate: Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "batched":
        runner = engine._runner
        monkeypatch.setattr(runner, "run", gate.wrap(runner.run))
        monkeypatch.setattr(runner, "close", gate.closing(runner.close, "context"))
    else:
        monkeypatch.setattr(llama_module._Decoder, "step",
                            gate.wrap(llama_module._Decoder.step))
        for ctx in engine._contexts:
            monkeypatch.setattr(ctx, "close", gate.closing(ctx.close, "context"))


@pytest.mark.model
@pytest.mark.parametrize("name", ENGINES)
async def test_aclose_waits_for_the_step_in_flight(name: str, model_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ENGINES[name](settings(model_path, 2))
    await engine.load()
    prompt = await engine.tokenize("Once upon a time")
    gate = Gate()
    gate_engine(name, engine, gate, monkeypatch)
    outcome: list[str] = []
    closed = trio.Event()

    async def consume(stream: AsyncGenerator[Chunk | Finish, None]) -> None:
        async with aclosing(stream):
            try:
                async for _ in stream:
                    pass
                outcome.append("finished")
            except EngineError as exc:
                outcome.append(f"error: {exc}")

    async def close() -> None:
        await engine.aclose()
        closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume, engine.generate_stream(request(prompt, 64)))
        await gate.entered()  # the first step is in its worker thread, held
        nursery.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()
        assert not closed.is_set() and gate.events == []  # nothing freed under the step
        gate.open()
        await closed.wait()
    assert gate.events[0] == "step returned" and "close context" in gate.events
    assert gate.events.index("close context") > gate.events.index("step returned")
    # No step ran after the close began: the stream ended with an error, not a crash.
    assert gate.events.count("step returned") == 1
    assert outcome == ["error: the engine is closed"]
