"""The numpy side of log-probabilities, without a model: the top ids (exact, ties by id),
the log-softmax, the penalties, and which tokens go with which chunk of text."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fabricai_trio.core.engine import TokenLogprob
from fabricai_trio.engine.logprobs import LogitProcessor, LogprobQueue, token_logprob, top_ids


@pytest.mark.parametrize("seed", range(40))
def test_top_ids_are_a_full_sort_by_logit_then_id(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 5000))
    if seed % 3 == 0:  # many ties
        logits = rng.integers(-40, 40, size=size).astype(np.float32)
    elif seed % 3 == 1:  # a peaked distribution: few tokens near the top
        logits = (rng.standard_normal(size) * 20).astype(np.float32)
    else:
        logits = rng.standard_normal(size).astype(np.float32)
    k = int(rng.integers(1, 80))
    expected = np.lexsort((np.arange(size), -logits))[:k]
    assert top_ids(logits, k).tolist() == expected.tolist()


def test_token_logprob_is_a_log_softmax() -> None:
    logits = np.array([2.0, 1.0, 0.5, -3.0, 1.0], dtype=np.float32)
    z = math.log(sum(math.exp(x) for x in logits.tolist()))
    result = token_logprob(logits, 1, 3, lambda t: f"<{t}>".encode(), b"one")
    assert result.token == 1 and result.piece == b"one"
    assert result.logprob == pytest.approx(1.0 - z, abs=1e-6)
    # most likely first; the tie between 1 and 4 goes to the lower id
    assert [t.token for t in result.top] == [0, 1, 4]
    assert [t.piece for t in result.top] == [b"<0>", b"one", b"<4>"]
    assert [t.logprob for t in result.top] == pytest.approx([2.0 - z, 1.0 - z, 1.0 - z])
    assert token_logprob(logits, 3, 0, bytes, b"").top == ()
    certain = np.array([0.0, -200.0], dtype=np.float32)
    assert token_logprob(certain, 0, 1, bytes, b"").logprob == 0.0  # never above 0


def test_processor_applies_bias_then_llama_cpp_penalties() -> None:
    processor = LogitProcessor.of(repeat_penalty=2.0, frequency_penalty=0.5,
                                  presence_penalty=1.0, logit_bias={3: -100.0})
    for token in (0, 0, 1):
        processor.accept(token)
    logits = np.array([4.0, -1.0, 3.5, 50.0], dtype=np.float32)
    processor.apply(logits)
    assert logits.tolist() == [4 / 2 - (2 * 0.5 + 1), -1 * 2 - (0.5 + 1), 3.5, -50.0]


def entry(piece: bytes) -> TokenLogprob:
    return TokenLogprob(0, piece, -1.0)


def test_queue_hands_out_tokens_with_their_text() -> None:
    queue = LogprobQueue()
    queue.add(entry(b"Hel"))
    assert queue.take("Hel") == (entry(b"Hel"),)
    queue.add(entry(b"lo"))
    queue.add(None)  # an end of generation has none
    assert queue.take("") == ()  # held back (a possible stop string): they wait
    queue.add(entry(b" wor"))
    assert queue.take("lo wor") == (entry(b"lo"), entry(b" wor"))
    queue.add(entry(b"ld"))
    assert queue.take("ld", last=True) == (entry(b"ld"),)


def test_queue_drops_a_stop_strings_tokens_at_the_end() -> None:
    """Stop string "\nEND": its tokens are held back with their text, then the text is
    cut, and so are they; a token that starts in the text kept stays."""
    queue = LogprobQueue()
    queue.add(entry(b"yes"))
    assert queue.take("yes") == (entry(b"yes"),)
    queue.add(entry(b".\n"))
    assert queue.take(".") == (entry(b".\n"),)
    queue.add(entry(b"EN"))
    assert queue.take("") == ()
    queue.add(entry(b"D"))
    assert queue.take("", last=True) == ()
