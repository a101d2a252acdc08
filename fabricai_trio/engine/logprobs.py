"""The logits both built-in engines sample from, and the log-probabilities they report.

llama.cpp's sampler chains (the batched engine's for temperature > 0, llama-cpp-python's
in `LlamaEngine`) start with the logit bias and the penalties (repeat, then frequency and
presence, over the last `PENALTY_LAST_N` generated tokens). `LogitProcessor` is the same
arithmetic in numpy: the batched engine's greedy rows sample with it, and both engines
report log-probabilities from it, so that for the same logits they give the same values:

    logprob(token) = log_softmax(processed logits)[token]   over the whole vocabulary

before the grammar's mask, temperature, and top-k / top-p / min-p truncation (what vLLM
and llama-server report by default too). Only a sequence that asked pays: one
log-sum-exp over the vocabulary a token, plus an `argpartition` for the top ones.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.engine import TokenLogprob, TopLogprob

PENALTY_LAST_N = 64  # llama-cpp-python's `last_n_tokens_size` default, as LlamaEngine has

Logits = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(slots=True)
class LogitProcessor:
    """`logit_bias`, then llama.cpp's penalties on the recent tokens, in place."""

    penalty: np.float32
    frequency: np.float32
    presence: np.float32
    bias_ids: np.ndarray[Any, np.dtype[np.intp]] | None = None
    bias_values: np.ndarray[Any, np.dtype[np.float32]] | None = None
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=PENALTY_LAST_N))

    @classmethod
    def of(cls, *, repeat_penalty: float, frequency_penalty: float, presence_penalty: float,
           logit_bias: Mapping[int, float]) -> LogitProcessor:
        processor = cls(np.float32(repeat_penalty), np.float32(frequency_penalty),
                        np.float32(presence_penalty))
        if logit_bias:
            processor.bias_ids = np.fromiter(logit_bias, dtype=np.intp)
            processor.bias_values = np.fromiter(logit_bias.values(), dtype=np.float32)
        return processor

    def apply(self, logits: Logits) -> None:
        """Bias and penalise `logits` (one step's, the whole vocabulary) in place."""
        if self.bias_ids is not None and self.bias_values is not None:
            logits[self.bias_ids] += self.bias_values
        if self.recent:
            ids, counts = np.unique(np.fromiter(self.recent, dtype=np.intp), return_counts=True)
            values = logits[ids]
            if self.penalty != 1:
                values = np.where(values <= 0, values * self.penalty, values / self.penalty)
            if self.frequency or self.presence:  # in float32, in llama.cpp's order
                values = values - (counts.astype(np.float32) * self.frequency + self.presence)
            logits[ids] = values

    def accept(self, token: int) -> None:
        """`token` was generated: it counts for the penalties of the next steps."""
        self.recent.append(token)


def top_ids(logits: Logits, k: int, peak: float | None = None
            ) -> np.ndarray[Any, np.dtype[np.intp]]:
    """The ids of the `k` largest logits, largest first (ties: the lower id first).

    An `argpartition` of the whole vocabulary costs ~2 ms for 262k tokens; the `k` best
    are nearly always among the few within a few nats of the top, so the partition runs
    on those (a comparison pass, ~0.1 ms), and on everything only when they are fewer
    than `k`. Exact either way."""
    k = min(k, logits.size)
    if peak is None:
        peak = float(logits.max())
    for margin in (8.0, 32.0):
        near = np.flatnonzero(logits >= peak - margin)
        if near.size >= k:
            break
    else:
        near = np.arange(logits.size)
    ids = near
    if near.size > k:
        values = logits[near]
        cut = values[np.argpartition(values, -k)[-k:]].min()
        above = near[values > cut]
        ids = np.concatenate([above, near[values == cut][: k - above.size]])  # `near` ascends
    return ids[np.lexsort((ids, -logits[ids]))]


def token_logprob(logits: Logits, token: int, top: int,
                  piece: Callable[[int], bytes], chosen_piece: bytes) -> TokenLogprob:
    """`token`'s log-probability under `logits` (already processed), with the `top`
    most likely tokens, most likely first (ties: the lower id first, as argmax)."""
    peak = float(logits.max())
    log_z = peak + float(np.log(np.exp(logits - peak, dtype=np.float32).sum(dtype=np.float64)))
    alternatives: tuple[TopLogprob, ...] = ()
    if top > 0:
        ids = top_ids(logits, top, peak)
        alternatives = tuple(
            TopLogprob(int(i), chosen_piece if i == token else piece(int(i)),
                       min(0.0, float(logits[i]) - log_z))
            for i in ids)
    # min: a near-certain token's rounding must not make it more than certain
    return TokenLogprob(token, chosen_piece, min(0.0, float(logits[token]) - log_z),
                        alternatives)


@dataclass(slots=True)
class LogprobQueue:
    """The log-probabilities of one stream's tokens, handed out with the text they made:
    a chunk carries those of the tokens decoded since the last chunk that had text (text
    held back for a possible stop string, or part of a character, holds them back too).
    The last chunk carries the rest, less the tokens that start past the text shown (a
    stop string's own tokens), so that the tokens listed spell the text."""

    pending: list[TokenLogprob] = field(default_factory=list)
    shown: int = 0  # bytes of text handed out
    listed: int = 0  # bytes of the tokens handed out

    def add(self, logprob: TokenLogprob | None) -> None:
        if logprob is not None:
            self.pending.append(logprob)

    def take(self, text: str, *, last: bool = False) -> tuple[TokenLogprob, ...]:
        """What goes with a chunk of `text` (`last`: the stream's last)."""
        if not text and not last:
            return ()
        self.shown += len(text.encode("utf-8"))
        out = []
        for logprob in self.pending:
            if last and self.listed >= self.shown:
                break
            out.append(logprob)
            self.listed += len(logprob.piece)
        self.pending.clear()
        return tuple(out)
