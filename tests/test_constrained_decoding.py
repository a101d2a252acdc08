"""Constrained decoding on the batched engine's runner, real model (Gemma's 262k-token
vocabulary): llguidance's token mask (engine/constraint.py) for JSON Schema, any JSON
object and GBNF grammars.

- what it writes follows the grammar, greedy and sampled, and ends (EOG) only where
  the grammar accepts; cut by the length, it is a prefix the grammar allows;
- greedy picks exactly the argmax of the masked logits (the top token is only checked
  against the mask, the mask applied when it is refused);
- for GBNF grammars, the mask allows the same tokens as llama.cpp's own grammar sampler
  over the whole vocabulary, at every step of a decode (the same acceptance);
- a seed gives the same tokens; log-probabilities are those of the logits before the
  mask.

Runs decode one sequence alone on one runner, so two runs' logits are the same bit for
bit: any difference in tokens is the sampling's.
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import numpy as np
import pytest
import trio

from fabricai_trio.engine import constraint as constraint_module
from fabricai_trio.engine.batch_scheduler import BatchScheduler
from fabricai_trio.engine.batch_step import BatchRunner, Sampling
from fabricai_trio.engine.constraint import Constraint, constraint_tokenizer
from fabricai_trio.engine.grammar import json_schema_grammar
from fabricai_trio.engine.model_text import ModelText
from fabricai_trio.settings import Settings

from .runner_decode import decode_alone, one_sequence_runner

pytestmark = pytest.mark.model

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16},
                   "population": {"type": "integer"}, "coastal": {"type": "boolean"}},
    "required": ["name", "population", "coastal"],
}
YES_NO = 'root ::= ("yes" | "no") "."'
DIGITS = 'root ::= [1-9] ("," [1-9]){2}'
OBJECT = json_schema_grammar({"type": "object"}, "response_format")
SCHEMA_GRAMMAR = json_schema_grammar(SCHEMA, "response_format")
# (prompt, llguidance grammar, the reply's check: a JSON Schema, a regex or None: JSON)
CASES: list[tuple[str, str, Any]] = [
    ("A city described in JSON:", OBJECT, None),
    ("The weather today, as JSON:", OBJECT, None),
    ("Name a city and its population as JSON.", SCHEMA_GRAMMAR, SCHEMA),
    ("Describe a harbour town in JSON.", SCHEMA_GRAMMAR, SCHEMA),
    ("Is the sea salty?", llguidance.grammar_from("gbnf", YES_NO), r"(yes|no)\."),
    ("Count:", llguidance.grammar_from("gbnf", DIGITS), r"[1-9](,[1-9]){2}"),
]
GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0, repeat_penalty=1.1, seed=0)
SAMPLED = Sampling(temperature=0.8, top_p=0.95, top_k=40, repeat_penalty=1.1, seed=3,
                   frequency_penalty=0.2, presence_penalty=0.1)


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Iterator[Any]:
    import llama_cpp

    v = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    yield v
    v.close()


@pytest.fixture(scope="module")
def runner(model_path: Path, vocab: Any) -> Iterator[BatchRunner]:
    r = one_sequence_runner(model_path)
    r.constraint_tokenizer = constraint_tokenizer(vocab._model.vocab)
    yield r
    r.close()


def check(text: str, ended: bool, expected: Any) -> None:
    if isinstance(expected, str):
        if ended:
            assert re.fullmatch(expected, text), text
        return
    if ended:
        value = json.loads(text)
        if expected is not None:
            jsonschema.validate(value, expected)
    else:  # cut by the length: still a prefix the grammar allows
        assert text.startswith("{"), text


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_it_writes_what_the_grammar_allows(runner: BatchRunner, vocab: Any,
                                           sampling: Sampling) -> None:
    ended_count = 0
    for prompt, grammar, expected in CASES:
        tokens = vocab.tokenize(prompt.encode(), add_bos=True)
        _, text, ended = decode_alone(runner, tokens, replace(sampling, grammar=grammar), 64)
        check(text, ended, expected)
        ended_count += ended
    assert ended_count >= 3  # the short grammars end by themselves (EOG where accepted)


def test_max_tokens_cuts_a_reply_the_grammar_has_not_finished(runner: BatchRunner,
                                                              vocab: Any) -> None:
    tokens = vocab.tokenize(b"A city described in JSON:", add_bos=True)
    generated, text, ended = decode_alone(runner, tokens, replace(GREEDY, grammar=OBJECT), 3)
    assert not ended and len(generated) == 3 and text.startswith("{")


def test_greedy_is_the_argmax_of_the_masked_logits(
    runner: BatchRunner, vocab: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = 0
    argmax = Constraint.argmax

    def counting(self: Constraint, logits: Any) -> int:
        nonlocal refused
        refused += not self.allows(int(np.argmax(logits)))
        return argmax(self, logits)

    def full_mask(self: Constraint, logits: Any) -> int:
        return int(np.argmax(self.masked(logits)))

    for prompt, grammar, _ in CASES:
        tokens = vocab.tokenize(prompt.encode(), add_bos=True)
        sampling = replace(GREEDY, grammar=grammar)
        monkeypatch.setattr(Constraint, "argmax", counting)
        fast = decode_alone(runner, tokens, sampling, 40)
        monkeypatch.setattr(Constraint, "argmax", full_mask)
        assert decode_alone(runner, tokens, sampling, 40) == fast, prompt
    assert refused >= 10  # a base model does not write JSON by itself: the mask decided


def test_a_seed_gives_the_same_tokens(runner: BatchRunner, vocab: Any) -> None:
    tokens = vocab.tokenize(b"Describe a harbour town in JSON.", add_bos=True)
    sampling = replace(SAMPLED, grammar=SCHEMA_GRAMMAR)
    first = decode_alone(runner, tokens, sampling, 48)
    assert decode_alone(runner, tokens, sampling, 48) == first
    other = [decode_alone(runner, tokens, replace(sampling, seed=s), 48)[0] for s in (4, 5)]
    assert any(o != first[0] for o in other)  # the seed is what chose


@pytest.mark.parametrize("gbnf", [YES_NO, DIGITS, 'root ::= "{" [a-z]{1,6} ": " [0-9]+ "}"'])
def test_the_mask_allows_what_llama_cpps_grammar_allows(
    runner: BatchRunner, vocab: Any, gbnf: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At each step of a sampled decode, llguidance's mask (from the GBNF converted to
    Lark) allows the texts llama.cpp's grammar sampler allows over the whole vocabulary
    (advanced by the same tokens), and no token it refuses."""
    import llama_cpp

    reference = llama_cpp.llama_sampler_init_grammar(runner._vocab, gbnf.encode(), b"root")
    n_vocab = runner._n_vocab
    steps = 0
    seen: list[int] = []
    compute = Constraint.compute
    accept = Constraint.accept

    def compare(self: Constraint) -> None:
        nonlocal steps
        compute(self)
        data = np.zeros(n_vocab, dtype=[("id", np.intc), ("logit", np.single),
                                        ("p", np.single)])
        data["id"] = np.arange(n_vocab)
        cur = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab,
            selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(reference, ctypes.byref(cur))
        theirs = np.isfinite(data["logit"])
        mine = self.allowed()
        assert not (mine & ~theirs).any(), (seen, np.flatnonzero(mine & ~theirs)[:10])
        # What llguidance refuses of llama.cpp's: only a byte-fallback token (`<0x2E>`)
        # whose text another allowed token has: the same texts are allowed.
        texts = {vocab.detokenize([int(t)], special=True) for t in np.flatnonzero(mine)}
        for t in np.flatnonzero(theirs & ~mine):
            assert vocab.detokenize([int(t)], special=True) in texts, (seen, int(t))
        assert mine.any()
        steps += 1

    def accept_both(self: Constraint, token: int) -> None:
        accept(self, token)
        llama_cpp.llama_sampler_accept(reference, token)
        seen.append(token)

    monkeypatch.setattr(Constraint, "compute", compare)
    monkeypatch.setattr(Constraint, "accept", accept_both)
    monkeypatch.setattr(constraint_module, "compute_masks", lambda cs: [c.compute() for c in cs])
    try:
        tokens = vocab.tokenize(b"Is the sea salty? Count:", add_bos=True)
        grammar = llguidance.grammar_from("gbnf", gbnf)
        decode_alone(runner, tokens, replace(SAMPLED, grammar=grammar, temperature=1.5), 16)
    finally:
        llama_cpp.llama_sampler_free(reference)
    assert steps >= 2


def test_logprobs_are_those_before_the_mask(runner: BatchRunner, vocab: Any) -> None:
    """The first token's alternatives under a grammar are the unconstrained ones
    (`docs/openai.md`: the value before the grammar's mask), whatever the mask chose."""
    tokens = vocab.tokenize(b"Is the sea salty?", add_bos=True)
    firsts = []
    for grammar in (None, llguidance.grammar_from("gbnf", YES_NO)):
        sched = BatchScheduler(slots=1, step_tokens=256)
        handle = sched.add(tokens, 1)
        sampling = {handle: replace(GREEDY, grammar=grammar, logprobs=5)}
        plan = sched.plan()
        result = runner.run(plan, sampling)
        sched.complete(plan, result.sampled)
        firsts.append(result.logprobs[handle])
        sched.release(handle, cache=False)
        plan = sched.plan()
        runner.run(plan, {})
        sched.complete(plan, {})
    plain, constrained = firsts
    assert [(t.token, t.logprob) for t in plain.top] == [
        (t.token, t.logprob) for t in constrained.top]
    assert constrained.piece.decode() in ("y", "ye", "yes", "n", "no")
    assert plain.token != constrained.token  # the mask chose another token


async def test_the_tokenizer_is_built_once_in_a_worker_thread() -> None:
    """`ModelText.constraint_tokenizer`: concurrent first requests share one build, which
    runs off the event loop (the loop keeps ticking meanwhile); it is kept, and its
    time is in the engine's status figures."""
    text = ModelText(Settings())  # type: ignore[call-arg]
    await text.load()
    try:
        assert text.stats()["constraint_tokenizer_seconds"] is None
        got: list[Any] = []
        ticks = 0

        async def ticking() -> None:
            nonlocal ticks
            while len(got) < 2:
                ticks += 1
                await trio.sleep(0.01)

        async def get() -> None:
            got.append(await text.constraint_tokenizer())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticking)
            nursery.start_soon(get)
            nursery.start_soon(get)
        assert got[0] is got[1]
        seconds = text.stats()["constraint_tokenizer_seconds"]
        assert isinstance(seconds, float) and seconds > 0
        assert ticks >= 5  # the loop ran while the tokenizer was built
        assert await text.constraint_tokenizer() is got[0]
        assert got[0].vocab_size == text.n_vocab
    finally:
        await text.aclose()
