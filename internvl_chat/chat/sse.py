"""A small, incremental Server-Sent Events reader (the WHATWG event-stream format).

OpenAI-compatible servers stream chat completions as `data: {json}` events ended by a blank line,
close with `data: [DONE]`, and may send comment lines (`:` ping keep-alives, as llama.cpp does),
named events (`event: error`; llama.cpp's `error: {json}` line is read as one) and multi-line data. Bytes arrive in arbitrary pieces, so a line, a
UTF-8 character or a `\\r\\n` may be split between two reads; the decoder keeps what is incomplete.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from ..errors import RemoteError

# One event far larger than any real chunk (a broken or hostile server); its JSON is parsed, at up
# to ~30× its size, so this bounds memory too
MAX_EVENT_CHARS = 8 << 20
FOREIGN_CHARS = 200  # kept of the first line that is not the format's


class StreamFailed(RemoteError):
    """An answer's stream failed once it had begun (the connection broke, the server sent an error
    or garbage): `what` says what happened, the line adds what to do. RemoteConversation keeps the
    text that came before it, with `what` in the answer's note."""

    def __init__(self, what: str, todo: str):
        super().__init__(f"{what}; {todo}")
        self.what = what


@dataclass(frozen=True)
class SSEEvent:
    data: str
    event: str = "message"  # the `event:` field, when the server names one
    id: str | None = None


class SSEDecoder:
    """Feed it bytes, get whole events back. Comment lines are counted, never returned."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # decoded text not yet split into lines
        self._tail: list[str] = []  # later pieces of text without a line break: joined once, when one comes
        self._tail_chars = 0
        self._data: list[str] = []
        self._data_chars = 0  # the length of the joined _data (+1), kept so a feed costs only its own size
        self._event = ""
        self._last_id: str | None = None
        self._started = False
        self._after_cr = False  # the text so far ended in a CR, taken as its line's end: an LF next is its CRLF's
        self.comments = 0
        self.foreign: str | None = None  # the start of the first line that is no field of the format (a page, text)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        text = self._utf8.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._after_cr and text:
            self._after_cr = False
            text = text.removeprefix("\n")
        if "\n" in text or "\r" in text:
            events = self._split_lines(final=False, searched=self._join_tail(text))
        else:  # one long line grows piece by piece: neither copied nor scanned again on each read
            self._tail.append(text)
            self._tail_chars += len(text)
            events = []
        if len(self._text) + self._tail_chars + self._data_chars > MAX_EVENT_CHARS:
            raise StreamFailed(
                f"the server sent one stream event of over {MAX_EVENT_CHARS >> 20} MiB", "is --server an OpenAI-compatible endpoint?"
            )
        return events

    def finish(self) -> list[SSEEvent]:
        """End of stream: a last line without its line break still counts; an unfinished event is dropped."""
        self._join_tail(self._utf8.decode(b"", final=True))
        return self._split_lines(final=True)

    def _join_tail(self, text: str) -> int:
        """Append the held pieces and `text`; return how much of the result holds no line break
        (the kept text may end in a \r or \r\n whose line is still to be split)."""
        searched = max(len(self._text) + self._tail_chars - 2, 0)
        self._text = "".join([self._text, *self._tail, text])
        self._tail, self._tail_chars = [], 0
        return searched

    def _split_lines(self, final: bool, searched: int = 0) -> list[SSEEvent]:
        """`searched`: text before it is known to hold no line break, so one long line is scanned once."""
        events: list[SSEEvent] = []
        text = self._text
        start = 0
        while True:
            cut = _next_break(text, max(start, searched))
            if cut is None:
                break
            end, after = cut
            if after == len(text) and text[end:] == "\r" and not final:
                # a CR at the end may be the first half of a CRLF: its line ends here either way (the
                # event it completes is returned by this read, not the next), and an LF next is skipped
                self._after_cr = True
            event = self._line(text[start:end])
            if event is not None:
                events.append(event)
            start = after
        rest = text[start:]
        if final and rest:
            event = self._line(rest)
            if event is not None:
                events.append(event)
            rest = ""
        self._text = rest
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name in ("data", "error"):  # "error": llama.cpp's own field for an error, an `event: error`'s data
            self._data.append(value)
            self._data_chars += len(value) + 1  # and the \n that joins it: empty lines count too
            if name == "error":
                self._event = "error"
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        elif name != "retry" and self.foreign is None:
            self.foreign = line[:FOREIGN_CHARS]  # ignored, as the format says; kept to say what came instead
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event
        self._data, self._event, self._data_chars = [], "", 0
        if not data:
            return None
        return SSEEvent("\n".join(data), event or "message", self._last_id)


# One search for either ending: looking for \n and \r apart scans to the end of the text for the
# kind that is absent, on every line (a read of a million blank lines took hours)
_LINE_BREAK = re.compile("\r\n?|\n")


def _next_break(text: str, start: int) -> tuple[int, int] | None:
    """(index of the next line break at or after start, index after it), or None."""
    found = _LINE_BREAK.search(text, start)
    return None if found is None else found.span()
