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

import ctypes
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from fabricai_trio.engine.batch_step import GRAMMAR_TOPS, BatchRunner, Sampling

from .runner_decode import decode_alone, one_sequence_runner

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
    r = one_sequence_runner(model_path)
    yield r
    r.close()


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Iterator[Any]:
    import llama_cpp

    v = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    yield v
    v.close()


def check_text(text: str, ended: bool, schema: dict[str, Any] | None) -> None:
    if ended:
        value = json.loads(text)
        if schema is not None:
            jsonschema.validate(value, schema)
    else:  # cut by the length: still a prefix the grammar allows
        assert text.lstrip().startswith("{"), text


def softmax(logits: np.ndarray) -> np.ndarray:
    e: np.ndarray = np.exp(logits.astype(np.float64) - logits.max())
    out: np.ndarray = e / e.sum()
    return out


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
    # seed 2: a logit bias lifts a digit (which JSON allows in numbers and strings) from
    # far down the list, and sinks a word
    seven, the = vocab.tokenize(b"7", add_bos=False)[-1], vocab.tokenize(b" the", add_bos=False)[-1]
    for seed, bias in ((1, {}), (2, {seven: 6.0, the: -4.0})):
        for prompt, grammar, schema in CASES:
            tokens = vocab.tokenize(prompt.encode(), add_bos=True)
            sampling = Sampling(**SAMPLED, seed=seed, grammar=grammar,  # type: ignore[arg-type]
                                logit_bias=bias)
            runner.grammar_tops = ()
            runner.check_refusals = None
            reference_refused = refused
            reference = decode_alone(runner, tokens, sampling, 48)
            refused = reference_refused  # count the shortcut's runs only
            runner.grammar_tops = GRAMMAR_TOPS
            runner.check_refusals = []
            fast = decode_alone(runner, tokens, sampling, 48)
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
    _, text, ended = decode_alone(runner, tokens, sampling, 64)
    check_text(text, ended, SCHEMA)


# --- chosen logits: the cases the model's own rarely shows ---

DIGIT = "root ::= [0-9]"


@pytest.fixture
def digits(runner: BatchRunner) -> Iterator[tuple[Any, list[int]]]:
    """A grammar allowing one digit, and the tokens it allows (by masking them all)."""
    import llama_cpp

    grammar = llama_cpp.llama_sampler_init_grammar(runner._vocab, DIGIT.encode(), b"root")
    logits = np.zeros(runner._n_vocab, dtype=np.single)
    cur = runner._candidate_array(logits)
    llama_cpp.llama_sampler_apply(grammar, ctypes.byref(cur))
    allowed = np.flatnonzero(np.isfinite(runner._candidates["logit"])).tolist()
    assert 10 <= len(allowed) < 40, allowed  # Gemma: one token a digit
    yield grammar, allowed
    llama_cpp.llama_sampler_free(grammar)


def chosen_logits(runner: BatchRunner, allowed: list[int], top: Sequence[float],
                  rest: Sequence[float], decoys: Sequence[float] | np.ndarray) -> np.ndarray:
    """Everything low (-5..0); `allowed` tokens at `top` then `rest` (then -10); tokens
    the grammar refuses at `decoys`."""
    rng = np.random.default_rng(0)
    logits: np.ndarray = rng.uniform(-5, 0, runner._n_vocab).astype(np.single)
    values = [*top, *rest]
    logits[allowed] = [*values, *[-10.0] * (len(allowed) - len(values))]
    refused = np.setdiff1d(np.arange(runner._n_vocab), allowed)[5000:5000 + len(decoys)]
    logits[refused] = decoys
    return logits


def shortcut_against_full_mask(runner: BatchRunner, grammar: Any, logits: np.ndarray,
                               top_k: int, bias: dict[int, float] | None = None
                               ) -> list[tuple[np.ndarray, np.ndarray]]:
    split = runner._new_split(Sampling(temperature=0.8, top_p=0.95, top_k=top_k,
                                       repeat_penalty=1.0, seed=0, grammar=DIGIT,
                                       logit_bias=bias or {}))
    runner.grammar_tops, runner.check_refusals = GRAMMAR_TOPS, []
    try:
        token = runner._sample_allowed(split, grammar, logits)
        assert np.isfinite(logits[token])
        return runner.check_refusals
    finally:
        runner.check_refusals = None
        split.free()


def test_fewer_allowed_than_k_whose_weight_could_change_top_p(
    runner: BatchRunner, digits: tuple[Any, list[int]]
) -> None:
    """Two allowed tokens among the top 48 (10 and 7.05: top-p 0.95 alone keeps the
    first only), five more allowed just below the 48th (6.5): they lower the first's
    probability under 0.95, so the full mask's top-p keeps the second too. Stopping at
    the top 48 would drop it; asking up to 1024 finds them."""
    grammar, allowed = digits
    logits = chosen_logits(runner, allowed, [10.0, 7.05], [6.5] * 5,
                           np.linspace(6.95, 6.9, 60))
    [(mine, full)] = shortcut_against_full_mask(runner, grammar, logits, 40)
    assert sorted(full["id"].tolist()) == sorted(allowed[:2])
    assert list(mine["id"]) == list(full["id"])
    assert np.array_equal(mine["logit"], full["logit"])


def test_k_allowed_among_the_top(runner: BatchRunner, digits: tuple[Any, list[int]]
                                 ) -> None:
    grammar, allowed = digits
    logits = chosen_logits(runner, allowed, [10.0, 9.0, 8.7, 8.5], [],
                           np.linspace(9.8, 6.0, 80))
    [(mine, full)] = shortcut_against_full_mask(runner, grammar, logits, 3)
    assert sorted(full["id"].tolist()) == sorted(allowed[:3])
    assert list(mine["id"]) == list(full["id"])
    assert np.array_equal(mine["logit"], full["logit"])


def test_a_biased_token_from_far_down(runner: BatchRunner, digits: tuple[Any, list[int]]
                                      ) -> None:
    """The bias lifts an allowed token from -2 (far below the 48 + PENALTY_LAST_N most
    likely before the bias) to 9.5, among the three highest allowed."""
    grammar, allowed = digits
    logits = chosen_logits(runner, allowed, [10.0, 9.0, 8.5, -2.0], [],
                           np.linspace(9.8, 7.0, 200))
    [(mine, full)] = shortcut_against_full_mask(runner, grammar, logits, 3,
                                                {allowed[3]: 11.5})
    assert sorted(full["id"].tolist()) == sorted([allowed[0], allowed[3], allowed[1]])
    assert list(mine["id"]) == list(full["id"])
    assert np.array_equal(mine["logit"], full["logit"])


@pytest.mark.parametrize("case", ["next allowed", "last asked about"])
def test_a_tie_at_the_cut_masks_everything(
    runner: BatchRunner, digits: tuple[Any, list[int]], case: str
) -> None:
    """Which of two tied tokens the top-k keeps is its sort's choice; and the k-th
    allowed token could tie one not asked about if it is the last asked about."""
    grammar, allowed = digits
    if case == "next allowed":
        logits = chosen_logits(runner, allowed, [10.0, 9.0, 8.5, 8.5], [],
                               np.linspace(9.8, 6.0, 80))
    else:  # the third allowed token is the 48th most likely
        logits = chosen_logits(runner, allowed, [10.0, 9.0, 7.0], [],
                               np.linspace(9.8, 7.5, 45))
        assert int(np.argsort(-logits)[GRAMMAR_TOPS[0] - 1]) == allowed[2]
    assert shortcut_against_full_mask(runner, grammar, logits, 3) == []
