"""llguidance on a llama.cpp vocabulary: one tokenizer per model (`constraint_tokenizer`,
built once, off the event loop), one matcher per constrained sequence (`Constraint`).

At each step a constrained sequence's token mask (a bit per token) is computed from
its matcher (~0.1 ms for Gemma's 262k tokens with a JSON Schema; the masks of a step's
rows are computed together, in parallel, by `compute_masks`), disallowed tokens get a
logit of -inf before the sampler chain, and the sampled token advances the matcher.
End-of-generation tokens are allowed only where the grammar accepts the text so far.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np
from llguidance import LLExecutor, LLMatcher, LLTokenizer
from llguidance.llamacpp import lltokenizer_from_vocab

from ..core.engine import EngineError
from .logprobs import Logits

# `lltokenizer_from_vocab` calls llama-cpp-python's deprecated `llama_token_get_attr`
# once per token: one warning per token of the vocabulary (262k for Gemma) otherwise.
warnings.filterwarnings("ignore", message="llama_token_get_attr is deprecated",
                        category=DeprecationWarning)

Allowed = np.ndarray[Any, np.dtype[np.bool_]]


def constraint_tokenizer(vocab: Any) -> LLTokenizer:
    """llguidance's tokenizer over a llama.cpp vocabulary (`llama_vocab_p`, which must
    outlive it: llguidance tokenizes through llama.cpp's `llama_tokenize`), built by
    llguidance's own `lltokenizer_from_vocab` (control tokens, and user-defined ones that
    look like them, are special: a grammar's text never matches them), with every
    end-of-generation token as an EOS (the library takes only `llama_vocab_eos` by
    default; chat models end turns with others), allowed where the grammar accepts.
    Blocking: ~2 s of CPU for Gemma's 262k tokens."""
    n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
    eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    return lltokenizer_from_vocab(vocab, eos_token=eog or None)


class Constraint:
    """One sequence's grammar state: `compute()` the mask, apply it, `accept()` the token."""

    def __init__(self, tokenizer: LLTokenizer, grammar: str, n_vocab: int) -> None:
        self.matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise EngineError(f"the grammar cannot be used: {self.matcher.get_error()}")
        self.n_vocab = n_vocab
        self.words = np.zeros((tokenizer.vocab_size + 31) // 32, dtype=np.int32)
        self._allowed: Allowed | None = None

    def compute(self) -> None:
        """The mask for the next token, from the tokens accepted so far (blocking; the
        GIL is released). `compute_masks` does several at once."""
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        self._allowed = None

    def allows(self, token: int) -> bool:
        return bool((int(self.words[token >> 5]) >> (token & 31)) & 1)

    def allowed(self) -> Allowed:
        """The mask as one bool per token of the model's vocabulary."""
        if self._allowed is None:
            bits = np.unpackbits(self.words.view(np.uint8), bitorder="little",
                                 count=self.n_vocab)
            self._allowed = bits.view(np.bool_)
        return self._allowed

    def masked(self, logits: Logits, out: Any = None) -> Logits:
        """`logits` with -inf for every token the grammar refuses, written into `out`
        (a float32 array or strided view of the vocabulary's size) or a copy. ~0.2 ms
        for Gemma's 262k tokens."""
        if out is None:
            out = logits.copy()
        else:
            out[...] = logits
        np.copyto(out, np.float32(-np.inf), where=~self.allowed())
        result: Logits = out
        return result

    def argmax(self, logits: Logits) -> int:
        """The most likely allowed token (ties: the lowest id), as masking then taking
        the argmax gives; the mask is only applied if the top token is refused."""
        token = int(np.argmax(logits))
        if self.allows(token):
            return token
        return int(np.argmax(self.masked(logits)))

    def accept(self, token: int) -> None:
        """Advance the grammar by the sampled token (which the mask allowed)."""
        if not self.matcher.consume_token(token):
            raise EngineError(f"the grammar refused token {token}: {self.matcher.get_error()}")


_EXECUTOR: LLExecutor | None = None


def compute_masks(constraints: Sequence[Constraint]) -> None:
    """`compute()` for each of `constraints`, in parallel on llguidance's own threads
    when there are several (the GIL is released meanwhile)."""
    global _EXECUTOR
    if len(constraints) == 1:
        constraints[0].compute()
        return
    if _EXECUTOR is None:
        _EXECUTOR = LLExecutor()
    groups: dict[int, list[Constraint]] = {}
    for c in constraints:  # one call per mask size (one model: one size)
        groups.setdefault(c.words.size, []).append(c)
    for size, group in groups.items():
        out = np.zeros((len(group), size), dtype=np.int32)
        _EXECUTOR.unsafe_compute_mask_ptr([(c.matcher, i) for i, c in enumerate(group)],
                                          out.ctypes.data, size * 4, len(group))
        for i, c in enumerate(group):
            c.words[:] = out[i]
            c._allowed = None
