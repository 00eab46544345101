"""A model's answer as the terminal shows it (and /export writes it): its line breaks kept, no controls.

A carriage return is a line break: `\\r\\n` one, a lone `\\r` one too (dropped, it ran the words on
either side together). Every other control character (escape sequences, bells) is dropped, bidi
overrides are shown as escapes. The answer stored in the conversation keeps its text as generated.

Streamed, a `\\r\\n` may come split over two deltas: `AnswerCleaner` holds a delta's last `\\r`
until the next delta (or the answer's end) says which it was.
"""

from __future__ import annotations

# Tabs and newlines stay; carriage returns are line breaks (`sanitize`); the rest must not reach a terminal.
_CONTROL = {c: None for c in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)]}
# Bidi embeddings, overrides and isolates would reorder what is shown (Trojan Source): shown as
# escapes. Right-to-left text itself, its marks (U+200E/F) and joiners are text and stay.
_CONTROL.update({c: f"\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]})


def sanitize(text: str) -> str:
    """`text` with `\\r\\n` and lone `\\r` as `\\n`, without other terminal control characters (tab
    stays), bidi overrides shown as escapes."""
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_CONTROL)


class AnswerCleaner:
    """`sanitize` for an answer arriving in deltas: what is shown is `sanitize` of the whole answer."""

    def __init__(self) -> None:
        self._held_cr = False  # the last delta ended with \r: a line break either way, but one or two?

    def feed(self, delta: str) -> str:
        """The part of `delta` that can be shown now."""
        if self._held_cr:
            delta = "\r" + delta
        self._held_cr = delta.endswith("\r")
        return sanitize(delta[:-1] if self._held_cr else delta)

    def finish(self) -> str:
        """What is still held at the answer's end (a last lone `\\r`: a line break); then empty."""
        held, self._held_cr = self._held_cr, False
        return "\n" if held else ""
