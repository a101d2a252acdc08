"""`StepCosts`: what a decode pass and a prompt token cost on this machine, measured as
steps run, so that a step's prompt chunk can be sized in time rather than in tokens.

Why: a step that carries a prompt chunk delays every decoding stream's next token by the
chunk's pass. In tokens, the same budget is a short stall on a fast machine and a long
one on a slow machine or beside many decoding rows; in time it is what the streams feel.
The budget is relative to a plain decode pass (`factor`: a step with prompt work takes
at most about `factor` decode passes), which keeps it meaningful on any hardware and at
any number of decoding streams. Pure: no clock of its own, the runner reports durations.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Weight of the newest measurement in the moving averages: about the last ten passes.
ALPHA = 0.2
#: Prompt passes shorter than this are not measured: their fixed cost (a graph, the
#: output row) would read as a high cost per token.
MIN_MEASURED_CHUNK = 8


@dataclass(slots=True)
class StepCosts:
    """Moving averages of a decode pass's duration and of a prompt token's, in seconds."""

    factor: float
    decode_pass_s: float | None = None
    prompt_token_s: float | None = None

    def observe_decode(self, seconds: float) -> None:
        """A pass of decode rows (one token each) took `seconds`."""
        self.decode_pass_s = _average(self.decode_pass_s, seconds)

    def observe_prompt(self, tokens: int, seconds: float) -> None:
        """A pass of one prompt chunk of `tokens` tokens took `seconds`."""
        if tokens >= MIN_MEASURED_CHUNK:
            self.prompt_token_s = _average(self.prompt_token_s, seconds / tokens)

    def prompt_budget(self) -> int | None:
        """Prompt tokens a step beside decoding streams may carry so that it takes about
        `factor` decode passes; None while either cost is unmeasured, or with the time
        budget off (`factor` 0)."""
        if self.factor <= 0 or self.decode_pass_s is None or not self.prompt_token_s:
            return None
        return int((self.factor - 1) * self.decode_pass_s / self.prompt_token_s)


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)
