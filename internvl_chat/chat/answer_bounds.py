"""What ends one streamed answer from a server early, here in the client: the user's cancel, the
answer-length limit it asked for, and a total time per answer.

The server's own limits cannot be trusted: a server that ignores max_tokens, or one that streams
valid events slowly without ever finishing, would hold a one-shot or `--script` run forever (the
read timeout restarts with every event) or fill memory. The client has no tokenizer of the model,
so it counts what it can see:
- content pieces: every server we know sends one piece per decoding step, holding back text that is
  not yet whole, so each piece is at least one token; the bound is twice max_tokens (plus a little
  slack), so that a proxy re-cutting the stream into smaller pieces still gets whole answers;
- characters: 64 a token (an average token is ~4), so pieces packed with text are cut too;
- events of any kind (content-less ones still cost a parse each).
Past a bound, or past the time, the answer stops where it is and what arrived is kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from ..threads import start_worker

PIECES_PER_TOKEN = 2  # servers send at most one piece a token; the spare one is for proxies that re-cut them
PIECE_SLACK = 16  # content pieces beyond that before the answer is cut
CHARS_PER_TOKEN = 64
EVENTS_PER_TOKEN = 4
ANSWER_SLACK = 1024  # characters and events beyond the per-token bounds
MIN_CONNECT_S = 0.01  # a connect timeout of 0 would be a non-blocking connect, which fails at once
CANCEL_POLL_S = 0.1  # how soon a cancel or the deadline ends an answer whose server has gone silent


def clock() -> float:
    """The time the deadline is measured in (tests replace it)."""
    return time.monotonic()


class Abortable(Protocol):
    def abort(self) -> None: ...


class AnswerBounds:
    """Counts one answer's pieces against the bounds; `over` names the bound passed ("length",
    "time") once one is. `total_s` 0 or None: no time bound."""

    def __init__(self, max_new_tokens: int, total_s: float | None):
        self.max_new_tokens = max_new_tokens
        self.total_s = total_s or None
        self.max_pieces = max_new_tokens * PIECES_PER_TOKEN + PIECE_SLACK
        self.max_chars = max_new_tokens * CHARS_PER_TOKEN + ANSWER_SLACK
        self.max_events = max_new_tokens * EVENTS_PER_TOKEN + ANSWER_SLACK
        self.deadline = clock() + self.total_s if self.total_s else None
        self.pieces = self.chars = self.events = 0
        self.over: str | None = None

    def event(self) -> bool:
        """Count one event; False once the events are past their bound."""
        self.events += 1
        if self.events > self.max_events:
            self.over = "length"
        return self.over is None

    def take(self, content: str) -> str:
        """The part of a content piece that fits (all of it, or a head, or nothing)."""
        if self.pieces + 1 > self.max_pieces:
            self.over = "length"
            return ""
        room = self.max_chars - self.chars
        if len(content) > room:
            self.over = "length"
            content = content[:room]
        self.pieces += 1
        self.chars += len(content)
        return content

    def time_up(self) -> bool:
        return self.deadline is not None and clock() >= self.deadline

    def time_left(self) -> float | None:
        """Seconds until the deadline (a little at least), or None without one: what a connection
        still being made may take. The watcher's abort abandons a connect (remote_sockets.Connector);
        the connect's own timeout ends at the deadline too, where httpx takes no Connector."""
        if self.deadline is None:
            return None
        return max(self.deadline - clock(), MIN_CONNECT_S)

    def note(self) -> str | None:
        """One line for the user when the answer was stopped here, else None."""
        if self.over == "length":
            return (f"the server sent more than the {self.max_new_tokens:,} tokens asked for (does it ignore "
                    "max_tokens?); the answer is cut there")  # fmt: skip
        if self.over == "time":
            return (f"the answer took longer than [remote] answer_timeout ({self.total_s:g} s) and is cut there; "
                    "raise it to wait longer")  # fmt: skip
        return None

    def failure(self) -> str:
        """One line for an answer stopped here before any of its text came."""
        if self.over == "time":
            return (f"the server sent no answer text within [remote] answer_timeout ({self.total_s:g} s); it may be "
                    "overloaded: try again, or raise answer_timeout to wait longer")  # fmt: skip
        return (f"the server sent far more than the {self.max_new_tokens:,} tokens asked for, and no text (it ignores "
                "max_tokens?); check the server, or try --dialect generic")  # fmt: skip


@contextmanager
def watched(stream: Abortable, cancel: threading.Event | None, bounds: AnswerBounds) -> Iterator[None]:
    """Abort `stream` when `cancel` is set or the time is up. The answer loop looks at both only
    between pieces, and a server gone silent sends none: a Ctrl-C would wait for the read timeout,
    and the deadline would never come."""
    if cancel is None and bounds.deadline is None:
        yield
        return
    cancel = cancel or threading.Event()
    finished = threading.Event()

    def watch() -> None:
        while not cancel.wait(CANCEL_POLL_S):
            if finished.is_set():
                return
            if bounds.time_up():
                bounds.over = bounds.over or "time"  # set before the abort: the loop reads it after
                break
        if not finished.is_set():
            stream.abort()

    start_worker(watch, "remote-watch")
    try:
        yield
    finally:
        finished.set()
