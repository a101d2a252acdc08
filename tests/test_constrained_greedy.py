"""Greedy constrained decoding on the batched engine's runner, real model: asking the
grammar about the most likely tokens only (`BatchRunner._allowed_argmax`) picks exactly
the tokens that masking the whole vocabulary at every step picks, and what it writes
follows the grammar.

Both runs decode the same sequence alone on the same runner, so their logits are the
same bit for bit: any difference in tokens would be the shortcut's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from fabricai_trio.engine.batch_step import GRAMMAR_TOPS, BatchRunner, Sampling

from .runner_decode import decode_alone, one_sequence_runner

pytestmark = pytest.mark.model

SCHEMA = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16},
                   "population": {"type": "integer"}, "coastal": {"type": "boolean"}},
    "required": ["name", "population", "coastal"],
})
YES_NO = 'root ::= ("yes" | "no") "."'
DIGITS = 'root ::= [1-9] ("," [1-9]){2}'
CASES = [
    ("A city described in JSON:", JSON_GBNF, None),
    ("The weather today, as JSON:", JSON_GBNF, None),
    ("Name a city and its population as JSON.", json_schema_to_gbnf(SCHEMA), None),
    ("Is the sea salty?", YES_NO, r"(yes|no)\."),
    ("Count:", DIGITS, r"[1-9](,[1-9]){2}"),
]


@pytest.fixture(scope="module")
def runner(model_path: Path) -> Iterator[BatchRunner]:
    r = one_sequence_runner(model_path)
    yield r
    r.close()


def tokenize(model_path: Path, text: str) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    try:
        return vocab.tokenize(text.encode(), add_bos=True)
    finally:
        vocab.close()


def decode(runner: BatchRunner, prompt: Sequence[int], grammar: str, n: int
           ) -> tuple[list[int], str, bool]:
    """Greedy under `grammar`, alone: (tokens, text, ended by itself)."""
    return decode_alone(runner, prompt, Sampling(temperature=0.0, top_p=1.0, top_k=0,
                                                 repeat_penalty=1.1, seed=0,
                                                 grammar=grammar), n)


def test_shortcut_picks_what_the_full_mask_picks(
    runner: BatchRunner, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = {"refused": 0, "full_masks": 0, "steps": 0}
    allowed_argmax, candidate_array, sample = (runner._allowed_argmax,
                                               runner._candidate_array, runner._sample)

    def counting_argmax(grammar: Any, logits: Any) -> int:
        counts["refused"] += 1
        return allowed_argmax(grammar, logits)

    def counting_mask(logits: Any) -> Any:
        counts["full_masks"] += 1
        return candidate_array(logits)

    def counting_sample(*args: Any) -> int:
        counts["steps"] += 1
        return sample(*args)

    monkeypatch.setattr(runner, "_allowed_argmax", counting_argmax)
    monkeypatch.setattr(runner, "_candidate_array", counting_mask)
    monkeypatch.setattr(runner, "_sample", counting_sample)
    shortcut_masks = shortcut_refused = shortcut_steps = 0
    for prompt, grammar, pattern in CASES:
        tokens = tokenize(model_path, prompt)
        runner.grammar_tops = ()
        reference = decode(runner, tokens, grammar, 40)
        runner.grammar_tops = GRAMMAR_TOPS
        before = dict(counts)
        fast = decode(runner, tokens, grammar, 40)
        shortcut_masks += counts["full_masks"] - before["full_masks"]
        shortcut_refused += counts["refused"] - before["refused"]
        shortcut_steps += counts["steps"] - before["steps"]
        assert fast == reference, prompt
        _, text, ended = fast
        if pattern is not None:
            assert ended and re.fullmatch(pattern, text), text
        elif ended:
            json.loads(text)
        else:  # cut by the length: still a prefix the grammar allows
            assert text.lstrip().startswith("{")
    # The grammar refused the model's top token often (a base model does not write
    # JSON by itself), and the shortcut mostly answered without the mask (a schema's
    # keys allow a handful of tokens, sometimes none among the 8192 most likely).
    assert shortcut_refused >= 10, counts
    assert shortcut_masks <= shortcut_refused // 2, (shortcut_masks, shortcut_refused)
    assert shortcut_steps > 0
