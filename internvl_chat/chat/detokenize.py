"""Streaming detokenisation: turn token ids into printable text one token at a time.

Byte-level BPE tokens can end inside a multi-byte UTF-8 character; decoding such a prefix yields
U+FFFD. We use the prefix-offset / read-offset technique: decode only a small window of recent
tokens, twice — the already-printed part (`ids[prefix:read]`) and the whole window
(`ids[prefix:]`) — and emit the difference. Text before a trailing U+FFFD is printed at once; the
incomplete character's tokens stay in the window until it decodes cleanly. The prefix tokens give
the decoder its left context (leading-space rules) without re-decoding the answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..engine.tokenizer import as_tokenizer

REPLACEMENT_CHAR = "\ufffd"
# A UTF-8 character is at most 4 bytes, so at most 4 byte-level tokens can be pending for a real
# character; a longer run of tokens that still ends in U+FFFD is genuinely invalid bytes, which we
# then print (as the full decode would) rather than let the window grow without bound, all but its
# last CHARACTER_START_TOKENS, which may begin a character still to come.
MAX_PENDING_TOKENS = 8
# the tokens that may hold the start of a character still to come: its lead byte and up to two more
CHARACTER_START_TOKENS = 3


def default_skip_ids(tokenizer: Any) -> set[int]:
    """All special tokens of the tokenizer (e.g. <|im_end|>, <img>): never printed."""
    return set(as_tokenizer(tokenizer).special_ids)


class IncrementalDetokenizer:
    """Decode one answer incrementally. `push(id)` returns new text; `flush()` the rest at the end."""

    def __init__(self, tokenizer: Any, skip_special_ids: Iterable[int] | None = None):
        self.tokenizer = as_tokenizer(tokenizer)
        self.skip_ids = frozenset(default_skip_ids(tokenizer) if skip_special_ids is None else skip_special_ids)
        self._ids: list[int] = []  # the decode window only: left context + pending tokens
        self._prefix = 0  # start of the decode window (left context, already printed)
        self._read = 0  # end of the printed part
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), cached until offsets move
        self._printed_pending = 0  # chars past the prefix text already printed while the window is open

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became printable (often "")."""
        token_id = int(token_id)
        if token_id in self.skip_ids:
            return ""
        self._ids.append(token_id)
        if len(self._ids) - self._read > MAX_PENDING_TOKENS:
            # invalid bytes, printed; but the last tokens may begin a character still to come (a
            # stray byte or two before an emoji): printed with the run, the emoji became U+FFFD
            return self._emit(force=True, keep=CHARACTER_START_TOKENS)
        return self._emit(force=False)

    @property
    def holding(self) -> bool:
        """Whether pushed tokens wait for more bytes (their text is not all given yet)."""
        return self._read < len(self._ids)

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._emit(force=True)

    def _emit(self, force: bool, keep: int = 0) -> str:
        if self._read == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        printed = len(self._prefix_text) + self._printed_pending
        end = len(self._ids)
        window_text = self._decode(self._ids[self._prefix :])
        if keep and window_text.endswith(REPLACEMENT_CHAR):  # the last `keep` tokens wait, unless they hold printed text
            cut = self._decode(self._ids[self._prefix : end - keep])
            if len(cut) >= printed:
                end, window_text = end - keep, cut
        complete = force or not window_text.endswith(REPLACEMENT_CHAR)
        # text before a trailing incomplete character is final: print it now, keep the tail pending
        printable = window_text if complete else window_text.rstrip(REPLACEMENT_CHAR)
        delta = printable[printed:]
        if complete and (force or len(window_text) > len(self._prefix_text)):
            # the printed part becomes the next window's left context; older ids are not needed
            del self._ids[: self._read]
            self._prefix, self._read = 0, end - self._read
            self._prefix_text = None
            self._printed_pending = 0
        else:
            self._printed_pending += len(delta)
        return delta
