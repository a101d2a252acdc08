"""The sampling set of llama-server and the OpenAI API (min_p, presence and frequency
penalties, logit_bias, seed) on both built-in engines, against the real model over a
real socket. Assertions are on effects that no near-tie can flip: a +100 bias forces a
token, -100 bans one, min_p=1 keeps only the top token whatever the seed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import numpy as np
import pytest

from fabricai_trio.engine.batch_step import Sampling, _Greedy

from .server_process import ServerProcess

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Iterator[llama_cpp.Llama]:
    llama = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    yield llama
    llama.close()


def complete(server: ServerProcess, **body: Any) -> str:
    response = httpx.post(f"{server.url}/v1/completions", timeout=60,
                          json={"prompt": "The weather today is", "max_tokens": 1,
                                "temperature": 0, **body})
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["text"]
    return text


def test_logit_bias_forces_and_bans_tokens(each_engine_server: ServerProcess,
                                           vocab: llama_cpp.Llama) -> None:
    (banana,) = vocab.tokenize(b" banana", add_bos=False)
    assert complete(each_engine_server, logit_bias={str(banana): 100}) == " banana"
    first = complete(each_engine_server)
    banned = vocab.tokenize(first.encode(), add_bos=False)
    again = complete(each_engine_server, logit_bias={str(t): -100 for t in banned})
    assert again != first


def test_min_p_one_keeps_only_the_top_token_whatever_the_seed(
    each_engine_server: ServerProcess,
) -> None:
    texts = {complete(each_engine_server, temperature=1.0, min_p=1.0, seed=seed, max_tokens=6)
             for seed in (1, 2, 3)}
    assert len(texts) == 1


def test_a_seed_reproduces_a_sampled_text(each_engine_server: ServerProcess) -> None:
    def sample(seed: int) -> str:
        return complete(each_engine_server, temperature=1.0, seed=seed, max_tokens=12)

    assert sample(42) == sample(42)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_frequency_and_presence_penalties_break_a_repetition(
    each_engine_server: ServerProcess,
) -> None:
    prompt = "1 1 1 1 1 1 1 1 1 1 1 1"
    plain = complete(each_engine_server, prompt=prompt, max_tokens=10, repeat_penalty=1.0)
    penalised = complete(each_engine_server, prompt=prompt, max_tokens=10, repeat_penalty=1.0,
                         frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised != plain


def test_greedy_penalties_follow_llama_cpp() -> None:
    """The numpy greedy path applies llama.cpp's penalties sampler's formula: repeat
    (divide positive logits, multiply negative ones), then minus count * frequency and
    presence, on the recent tokens; logit_bias first."""
    greedy = _Greedy.of(Sampling(temperature=0, top_p=1, top_k=0, repeat_penalty=2.0, seed=None,
                                 frequency_penalty=0.5, presence_penalty=1.0,
                                 logit_bias={3: -100.0}))
    greedy.processor.recent.extend([0, 0, 1])
    logits = np.array([4.0, -1.0, 3.5, 50.0], dtype=np.float32)
    assert greedy.pick(logits) == 2
    assert logits.tolist() == [4 / 2 - 2 * 0.5 - 1, -1 * 2 - 0.5 - 1, 3.5, -50.0]
