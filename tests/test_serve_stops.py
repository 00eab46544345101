"""Stop strings over streamed text (serve/stops.py) against a naive reference, and their cost.

The reference says what the server sends from the whole text so far, after each push: once the
text holds a stop string, the text up to where the one that ends first begins (of those ending
together, the earliest to begin; nothing after, ever), else all but the longest end that begins a
stop string. The matcher must send exactly that after
every push, for any split of the text. The cost is counted in the matcher's steps, not timed.
"""

from __future__ import annotations

import random

import pytest

from internvl_chat.serve.protocol import MAX_STOP_STRINGS
from internvl_chat.serve.stops import StopStrings


class Reference:
    """What may be sent after each push, from the whole text so far (slow and plain)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.cut: int | None = None

    def push(self, piece: str) -> str:
        """Everything sendable so far (not the delta)."""
        if self.cut is None:
            self.text += piece
            # each stop string's first place in the text (its earliest end too), as (end, start)
            found = [(i + len(s), i) for s in self.stops if (i := self.text.find(s)) >= 0]
            if found:
                self.hit_end, self.cut = min(found)
        if self.cut is not None:
            return self.text[: self.cut]
        keep = max((n for s in self.stops for n in range(len(s)) if n and self.text.endswith(s[:n])), default=0)
        return self.text[: len(self.text) - keep]

    def end(self) -> str:
        return self.text if self.cut is None else self.text[: self.cut]


def _check(stops: list[str], pieces: list[str]) -> None:
    matcher, reference, sent = StopStrings(stops), Reference(stops), ""
    for k, piece in enumerate(pieces):
        sent += matcher.push(piece)
        assert sent == reference.push(piece), (stops, pieces[: k + 1])
        assert matcher.hit == (reference.cut is not None)
        if matcher.hit:  # usage counts the tokens up to it: the same for any split of the text
            assert matcher.hit_end == reference.hit_end, (stops, pieces[: k + 1])
    sent += matcher.flush()
    assert sent == reference.end(), (stops, pieces)
    if matcher.hit:
        assert matcher.push("more") == ""  # after a stop, nothing more is sent


def _split(rng: random.Random, text: str) -> list[str]:
    """`text` in random pieces, empty ones included (a token can decode to no text yet)."""
    pieces, i = [], 0
    while i < len(text):
        n = rng.choice((0, 1, 1, 1, 2, 3, 5, 8))
        pieces.append(text[i : i + n])
        i += n
    return pieces


# a small alphabet, so stop strings overlap, repeat and begin inside each other often; several
# UTF-8 lengths (é two bytes, € three, 🙂 four: one character each in a Python str)
ALPHABET = "ab\u00e9\u20ac\U0001f642"


@pytest.mark.parametrize("seed", range(8))
def test_random_texts_stops_and_splits_agree_with_the_reference(seed):
    rng = random.Random(seed)
    for _ in range(400):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        stops = []
        for _ in range(rng.randint(1, 5)):
            if text and rng.random() < 0.5:  # often a piece of the text itself, so it matches
                i = rng.randrange(len(text))
                stops.append(text[i : i + rng.randint(1, 8)])
            else:
                stops.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 6))))
        _check(stops, _split(rng, text))


@pytest.mark.parametrize(("stops", "pieces", "expect"), [
    (["END"], ["The answer is 4", "2.E", "N", "D and more"], "The answer is 42."),  # split across three pieces
    (["abcd", "bc"], ["abc", "d"], "a"),  # "bc" is complete first: the text is cut there
    (["abcd", "bc"], ["ab", "cd"], "a"),  # both complete in one push: "bc" ended first, as above
    (["abc", "bc"], ["abc"], ""),  # both end at once: the one that begins first wins
    (["world", "lo"], ["hello world"], "hel"),
    (["aab"], ["a", "a", "a", "a", "b", "x"], "aa"),  # the held "aaa" slides; "aab" begins at 2
    (["abab", "bab"], ["a", "b", "a", "b"], ""),  # overlapping stops ending together: the earlier start
    (["abab", "bab"], ["aba", "bx"], ""),
    (["le r", "e"], ["A triangle right."], "A triangl"),  # "e" ends first, whatever the split
    (["\U0001f642\u00e9"], ["x\U0001f642", "\u00e9 after"], "x"),  # four- and two-byte characters
    (["\u20ac\u20ac"], ["1\u20ac", "2\u20ac", "\u20ac3"], "1\u20ac2"),
    (["x"], ["", "", "x"], ""),  # empty pieces
    (["xyz"], ["x", "y"], "xy"),  # the end of the answer sends what was held
])  # fmt: skip
def test_cases_that_show_the_rule(stops, pieces, expect):
    matcher = StopStrings(stops)
    assert "".join(matcher.push(p) for p in pieces) + matcher.flush() == expect
    _check(stops, pieces)


@pytest.mark.parametrize("stops", [["\u20acbbb", "\u20ac"], ["\u20ac", "\u20acbbb"], ["abc", "ab"]])
def test_where_the_stop_string_ends_does_not_depend_on_how_the_text_was_split(stops):
    """Two stop strings beginning at the cut, both complete in one push (an event of several tokens,
    [generation] stream_interval): the cut is where the shorter ends, as when each character comes
    alone; the list's first one was taken, and usage counted the tokens of the longer one's end."""
    text = "x" + max(stops, key=len) + "yz"
    ends = set()
    for pieces in ([text], list(text), [text[:2], text[2:]]):
        matcher = StopStrings(stops)
        assert "".join(matcher.push(p) for p in pieces) + matcher.flush() == "x"
        ends.add(matcher.hit_end)
    assert ends == {1 + min(map(len, stops))}


def test_held_text_goes_out_as_soon_as_it_cannot_begin_a_stop_string():
    matcher = StopStrings(["<|end|>", "STOP"])
    assert matcher.push("a <|en") == "a "  # "<|en" may begin "<|end|>"
    assert matcher.push("ough") == "<|enough"  # it did not
    assert matcher.push(" ST") == " "
    assert matcher.push("OP!") == "" and matcher.hit
    assert matcher.flush() == ""


def test_a_stop_string_of_a_megabyte_costs_only_what_the_text_follows_of_it():
    """The failure table grows only as far as the text has spelled the stop string."""
    stop = "ab" * (1 << 19)  # 1 MiB of characters
    matcher = StopStrings([stop])
    text = "ab" * 500 + "x"
    assert "".join(matcher.push(c) for c in text) == text
    inner = matcher._matchers[0]
    assert len(inner._border) <= len(text) + 1
    assert matcher.steps <= 4 * len(text)


def test_the_worst_case_costs_a_few_steps_per_character_and_stop_string():
    """The limit's number of long stop strings against a text that spells most of each of them,
    then breaks off, over and over: the held text is long and always almost a match. Searching
    all the held text again on every push cost time quadratic in the stop strings' length."""
    half = 2000
    stops = ["a" * half + "x" + "a" * half + chr(0x100 + k) for k in range(MAX_STOP_STRINGS)]
    text = ("a" * half + "x" + "a" * half + "a") * 3
    matcher, sent = StopStrings(stops), ""
    for c in text:  # one character per push: the most pushes
        sent += matcher.push(c)
    assert sent + matcher.flush() == text and not matcher.hit
    assert matcher.steps <= 4 * len(stops) * len(text)
