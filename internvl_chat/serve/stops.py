"""Stop strings over streamed text: hold back what could still become a stop string, cut at one.

The answer is cut where the stop string that the text completed first begins (of several ending
at one place, the one that begins earliest): where generation would stop with one character
pushed at a time, so the cut does not depend on how the text was split into pushes
([generation] stream_interval). The text before it is sent, nothing from it on. Text is held back only while its end could still begin a
stop string, and sent as soon as it cannot.

A request may send 16 stop strings of up to 1,000 characters (serve/protocol.py), and the cost
must not grow with their length (before that cap they could be megabytes, and searching the held
text again on every push was quadratic in it: one character pushed after 128,000 held took 11 s of
the engine thread). Each stop string is followed by a Knuth–Morris–Pratt automaton that remembers
how much of it the text's end spells, its failure table built only as far as the text has followed
it; a pushed character costs a few steps per stop string, and held text is kept in pieces, copied
once when it is sent.
"""

from __future__ import annotations

import collections


class _StopMatcher:
    """One stop string, followed character by character across pushes."""

    def __init__(self, stop: str):
        self.stop = stop
        self.state = 0  # how many of the stop string's first characters the text so far ends with
        self._border = [0]  # _border[i]: the longest proper prefix of stop[:i+1] that also ends it
        self.steps = 0  # characters looked at and table entries made (tests bound the cost with it)

    def _fallback(self, i: int) -> int:
        """_border[i], the table extended that far (amortized: each entry is made once)."""
        stop, border = self.stop, self._border
        while len(border) <= i:
            j, k = len(border), border[-1]
            while k and stop[j] != stop[k]:
                k = border[k - 1]
                self.steps += 1
            border.append(k + 1 if stop[j] == stop[k] else k)
            self.steps += 1
        return border[i]

    def feed(self, text: str) -> int:
        """Follow `text`; the index in it just past the stop string's first complete match, or -1."""
        stop, q, i, n = self.stop, self.state, 0, len(text)
        first, length = stop[0], len(stop)
        while i < n:
            if q == 0:  # nothing begun: skip to where the stop string could begin (a search in C)
                j = text.find(first, i)
                self.steps += (n if j < 0 else j) - i
                if j < 0:
                    break
                i = j
            c = text[i]
            self.steps += 1
            while q and stop[q] != c:
                q = self._fallback(q - 1)
                self.steps += 1
            if stop[q] == c:
                q += 1
                if q == length:
                    self.state = q
                    return i + 1
            i += 1
        self.state = q
        return -1


class StopStrings:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._matchers = [_StopMatcher(s) for s in self.stops]
        self._held: collections.deque[str] = collections.deque()  # text not sent yet, in pieces
        self._held_len = 0
        self._offset = 0  # characters of _held[0] already sent
        self._pushed = 0  # characters of all the text pushed
        self.hit = False
        # once hit: where the stop string that cut the text ends in all of it (where the text first
        # held one, however the text was split)
        self.hit_end = 0

    @property
    def steps(self) -> int:
        """The matching work done so far, in characters and table entries."""
        return sum(m.steps for m in self._matchers)

    def push(self, text: str) -> str:
        """Add streamed text; return the part that is safe to send (never any of a stop string)."""
        if self.hit:
            return ""
        if not self._matchers:
            return text
        if text:
            self._held.append(text)
            self._held_len += len(text)
            self._pushed += len(text)
        cut = -1
        for m in self._matchers:  # every one: a later stop string may complete earlier
            end = m.feed(text)
            if end >= 0:
                start = self._held_len - len(text) + end - len(m.stop)  # in the held text
                at = self._pushed - len(text) + end  # where it ends in all the text
                # the one that ends first (pushes of one character each would stop there), of those
                # ending together the one that begins first: the same cut and usage for any split
                if cut < 0 or at < self.hit_end or (at == self.hit_end and start < cut):
                    cut, self.hit_end = start, at
        if cut >= 0:
            self.hit = True
            out = self._send(cut)
            self._held.clear()
            self._held_len = self._offset = 0
            return out
        # keep the longest end that begins some stop string (never longer than the held text:
        # what was sent could not begin one)
        return self._send(self._held_len - max(m.state for m in self._matchers))

    def flush(self) -> str:
        """At the end of the answer: the held-back text (it never completed a stop string)."""
        out = "" if self.hit else self._send(self._held_len)
        self._held.clear()
        self._held_len = self._offset = 0
        return out

    def _send(self, n: int) -> str:
        """The first `n` held characters, no longer held."""
        parts = []
        self._held_len -= n
        while n:
            piece, start = self._held[0], self._offset
            if len(piece) - start <= n:
                parts.append(piece[start:] if start else piece)
                n -= len(piece) - start
                self._held.popleft()
                self._offset = 0
            else:
                parts.append(piece[start : start + n])
                self._offset += n
                n = 0
        return "".join(parts)
