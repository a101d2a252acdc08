"""Stop strings and UTF-8 reassembly, without a model."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from fabricai_trio.core.textstream import StopMatcher, TextAssembler


def run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush(), matcher.stopped


def test_no_stops_passes_through() -> None:
    assert run([], ["a", "b"]) == ("ab", False)


def test_stop_inside_one_piece() -> None:
    assert run(["END"], ["abcENDdef"]) == ("abc", True)


def test_stop_across_pieces_is_held_back() -> None:
    matcher = StopMatcher(["<end>"])
    assert matcher.feed("hello <e") == "hello "
    assert matcher.feed("n") == ""
    assert matcher.feed("d> more") == ""
    assert matcher.stopped


def test_false_alarm_is_released() -> None:
    matcher = StopMatcher(["<end>"])
    assert matcher.feed("a <en") == "a "
    assert matcher.feed("try") == "<entry"


def test_earliest_of_several_stops_wins() -> None:
    assert run(["xyz", "b"], ["a", "bxyz"]) == ("a", True)


def test_flush_returns_held_text_at_end() -> None:
    assert run(["<end>"], ["tail <e"]) == ("tail <e", False)


def test_utf8_split_across_tokens() -> None:
    data = "héllo 世界".encode()
    assembler = TextAssembler([])
    out = "".join(assembler.feed(data[i : i + 1]) for i in range(len(data)))
    assert out + assembler.flush() == "héllo 世界"


@given(
    text=st.text(alphabet="ab<>end", max_size=40),
    stop=st.text(alphabet="ab<>end", min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_matches_a_plain_search(text: str, stop: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    index = text.find(stop)
    expected = (text, False) if index < 0 else (text[:index], True)
    assert run([stop], pieces) == expected
