"""Token bytes to user-visible text: UTF-8 reassembly and stop strings, with no I/O.

A token can end in the middle of a UTF-8 character, and a stop string can span
tokens, so text is held back until it is known to be safe to show. Kept apart from
the engine so any backend can reuse it and it can be tested without a model.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class StopMatcher:
    """Finds the first stop string in streamed text, holding back possible prefixes."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return what is now safe to emit (nothing after a stop)."""
        if self.stopped:
            return ""
        self._pending += text
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        cut = min(
            (i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1
        )
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        hold = self._longest_stop_prefix_suffix()
        split = len(self._pending) - hold
        out, self._pending = self._pending[:split], self._pending[split:]
        return out

    def flush(self) -> str:
        """The held-back text, once the stream ends without a stop string."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextAssembler:
    """Token bytes in, safe text out: UTF-8 reassembly followed by `StopMatcher`."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def feed(self, piece: bytes) -> str:
        return self._stops.feed(self._decoder.decode(piece))

    def flush(self) -> str:
        return self._stops.feed(self._decoder.decode(b"", final=True)) + self._stops.flush()
