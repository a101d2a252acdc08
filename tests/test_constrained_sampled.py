"""Sampled constrained decoding on the batched engine's runner, real model: when the
grammar refuses the sampled token, finding the top-k allowed tokens among the most
likely ones (`BatchRunner._sample_allowed`) gives the rest of the chain exactly the
candidates that masking the whole vocabulary gives it, and what it writes follows the
grammar.

Each refusal the shortcut answers is checked against the full mask on the same logits
(`BatchRunner.check_refusals`: the candidates after top-k, typical, top-p, min-p and the
temperature, which dist samples from). And as the chain draws once either way, the same
seed writes the same tokens with the shortcut as with the full mask (`grammar_tops=()`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from fabricai_trio.engine.batch_scheduler import BatchScheduler, Phase
from fabricai_trio.engine.batch_step import GRAMMAR_TOPS, BatchRunner, Sampling

pytestmark = pytest.mark.model

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16},
                   "population": {"type": "integer"}, "coastal": {"type": "boolean"}},
    "required": ["name", "population", "coastal"],
}
SCHEMA_GBNF = json_schema_to_gbnf(json.dumps(SCHEMA))
CASES = [
    ("A city described in JSON:", JSON_GBNF, None),
    ("The weather today, as JSON:", JSON_GBNF, None),
    ("Name a city and its population as JSON.", SCHEMA_GBNF, SCHEMA),
    ("Describe a harbour town in JSON.", SCHEMA_GBNF, SCHEMA),
]
SAMPLED = dict(temperature=0.8, top_p=0.95, top_k=40, repeat_penalty=1.1,
               frequency_penalty=0.2, presence_penalty=0.1)


@pytest.fixture(scope="module")
def runner(model_path: Path) -> Iterator[BatchRunner]:
    r = BatchRunner(model_path, n_seq_max=1, n_ctx_seq=512, n_batch=264, n_outputs=1,
                    n_threads=1)
    yield r
    r.close()


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Iterator[Any]:
    import llama_cpp

    v = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    yield v
    v.close()


def decode(runner: BatchRunner, prompt: Sequence[int], sampling: Sampling, n: int
           ) -> tuple[list[int], str, bool]:
    """Sampled under the grammar, alone: (tokens, text, ended by itself)."""
    sched = BatchScheduler(slots=1, step_tokens=256)
    handle = sched.add(prompt, n)
    text, eog = b"", False
    while sched.phase(handle) is not Phase.DONE:
        plan = sched.plan()
        result = runner.run(plan, {handle: sampling})
        assert result.error is None
        for sampled in sched.complete(plan, result.sampled):
            text += result.pieces[sampled.handle]
            eog = eog or sampled.eog
        sched.consumed(handle, n)
    tokens = sched.generated(handle)
    sched.release(handle, cache=False)
    plan = sched.plan()
    runner.run(plan, {})
    sched.complete(plan, {})
    return tokens, text.decode("utf-8"), eog


def check_text(text: str, ended: bool, schema: dict[str, Any] | None) -> None:
    if ended:
        value = json.loads(text)
        if schema is not None:
            jsonschema.validate(value, schema)
    else:  # cut by the length: still a prefix the grammar allows
        assert text.lstrip().startswith("{"), text


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits.astype(np.float64) - logits.max())
    return e / e.sum()


def test_shortcut_samples_from_what_the_full_mask_leaves(
    runner: BatchRunner, vocab: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = 0
    sample_allowed = runner._sample_allowed

    def counting_allowed(*args: Any) -> int:
        nonlocal refused
        refused += 1
        return sample_allowed(*args)

    monkeypatch.setattr(runner, "_sample_allowed", counting_allowed)
    checked = 0
    for seed in (1, 2):
        for prompt, grammar, schema in CASES:
            tokens = vocab.tokenize(prompt.encode(), add_bos=True)
            sampling = Sampling(**SAMPLED, seed=seed, grammar=grammar)  # type: ignore[arg-type]
            runner.grammar_tops = ()
            runner.check_refusals = None
            reference_refused = refused
            reference = decode(runner, tokens, sampling, 48)
            refused = reference_refused  # count the shortcut's runs only
            runner.grammar_tops = GRAMMAR_TOPS
            runner.check_refusals = []
            fast = decode(runner, tokens, sampling, 48)
            for mine, full in runner.check_refusals:
                assert mine.size > 0
                assert list(mine["id"]) == list(full["id"]), prompt
                assert np.array_equal(mine["logit"], full["logit"]), prompt
                assert np.array_equal(softmax(mine["logit"]), softmax(full["logit"]))
            checked += len(runner.check_refusals)
            assert fast == reference, (prompt, seed)
            check_text(fast[1], fast[2], schema)
    runner.check_refusals = None
    # The grammar refused the sampled token often (a base model does not write JSON by
    # itself), and the shortcut answered most refusals (each checked) without the mask
    # (a schema's keys allow a handful of tokens, sometimes none among the 8192 most
    # likely).
    assert refused >= 30, refused
    assert checked >= refused * 2 // 3, (checked, refused)


@pytest.mark.parametrize("top_k", [0, 1])
def test_without_a_usable_top_k_it_still_follows_the_grammar(
    runner: BatchRunner, vocab: Any, top_k: int
) -> None:
    """top_k 0 (off): the whole vocabulary is masked on a refusal, as before; top_k 1:
    the shortcut's search stops at the first allowed token."""
    tokens = vocab.tokenize(b"Name a city and its population as JSON.", add_bos=True)
    sampling = Sampling(**{**SAMPLED, "top_k": top_k}, seed=3,  # type: ignore[arg-type]
                        grammar=SCHEMA_GBNF)
    runner.grammar_tops = GRAMMAR_TOPS
    _, text, ended = decode(runner, tokens, sampling, 64)
    check_text(text, ended, SCHEMA)
