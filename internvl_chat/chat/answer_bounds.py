"""What ends one streamed answer from a server early, here in the client: the user's cancel, the
answer-length limit it asked for, a total time per answer, and the short wait after the server
has finished the answer (its finish_reason) for what may still follow (the usage chunk, `[DONE]`).

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

A server that sends the finish_reason and then only keep-alives, or nothing, neither `[DONE]` nor
closing, held the finished answer (and the prompt) for the whole read timeout. Servers send the
usage chunk and `[DONE]` right after the finish_reason (vLLM, SGLang, llama.cpp, Ollama, our own
serve), so FINISHED_GRACE_S after it the answer ends as it is, whole (only what was still awaited
is lost), and its connection is closed. That grace is the time the reader waits for the server, not
the clock's: the time the answer's consumer holds it (a slow terminal, a busy screen: the answer's
generator suspended at a yield, `holding`) does not count, nor more than MAX_POLL_S of one poll (the
whole program stopped by Ctrl-Z, then `fg`): else what the server sent at once was shut out of the
stream unread (a shut socket's queued bytes are still read on Linux, but dropped on macOS and BSD,
reset on Windows) and the connection was not kept for the next turn.

Which finish_reason starts the grace is remote.py's: not one before any text (a proxy's on the
role's chunk), nor one on the chunk that brings the first text (proxies that put one on every chunk
from the first, Gemini's long pieces seconds apart: the next chunk's text shows it was none, and the
first gap cut the answer; a next chunk without text, the usage, shows it was one), nor any once text
came after one that came with or after text (one before any text takes nothing back). Real servers
put it on the last chunk of text or on an empty one after it (vLLM, SGLang, llama.cpp's `delta: {}`,
Ollama, LiteLLM).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
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
# after the answer's finish_reason: what may still legitimately follow (the usage chunk, then
# [DONE]) comes at once from every server we know; a few seconds is generous (and never more than
# the read timeout, which would have ended the wait anyway)
FINISHED_GRACE_S = 3.0
# the most one of the watcher's polls (CANCEL_POLL_S apart) counts toward the grace: a poll that came
# far later was a program stopped (Ctrl-Z) or starved, not a server's silence
MAX_POLL_S = 1.0


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
        # the server finished the answer: the `waited_s` at which to stop waiting for the rest (None: not finished)
        self.grace_end: float | None = None
        self.waited_s = 0.0  # the time the reader waited for the server, as the watcher counts it (its thread's)
        self.holding = False  # the answer's consumer has it (at a yield): that time is not the server's
        self.since: float | None = None  # the clock's reading the watcher's next step is counted from
        self._watch: Callable[[], None] | None = None  # starts the watcher, if not running (`watched`)

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

    def finishing(self, grace_s: float) -> None:
        """The server has finished the answer (a finish_reason after some text): what may follow is
        waited for `grace_s` s more of the reader's waiting, not for the read timeout. Text after it
        takes that back (`unfinished`)."""
        self.since = clock()  # the grace counts from now, also where no watcher reads the clock yet
        self.grace_end = self.waited_s + grace_s
        if self._watch is not None:
            self._watch()

    def unfinished(self) -> None:
        """Text came after the finish_reason: it finished nothing, and the answer is waited for as any other."""
        self.grace_end = None

    def waited(self, step_s: float) -> bool:
        """Count `step_s` s of the watcher's poll as the reader's wait, unless the consumer holds the
        answer (at most MAX_POLL_S of it); True once the grace after the finish is used up. Called by
        the watcher's thread only."""
        if not self.holding:
            self.waited_s += min(max(step_s, 0.0), MAX_POLL_S)
        end = self.grace_end
        return end is not None and not self.holding and self.waited_s >= end

    def time_up(self, now: float | None = None) -> bool:
        return self.deadline is not None and (clock() if now is None else now) >= self.deadline

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
    """Abort `stream` when `cancel` is set, the time is up, or the server finished the answer and
    the grace after it is over (`bounds.finishing`, counted in `bounds.waited`). The answer loop
    looks at these only between pieces, and a server gone silent sends none: a Ctrl-C would wait
    for the read timeout, and the deadline would never come. Without a cancel or a deadline the
    watcher starts only when the server finishes the answer."""
    watching = cancel is not None or bounds.deadline is not None
    own = cancel is None  # no user's cancel: this one only wakes the watcher when the answer ends
    cancel = cancel or threading.Event()
    finished = threading.Event()
    started: threading.Thread | None = None

    def watch() -> None:
        while not cancel.wait(CANCEL_POLL_S):
            if finished.is_set():
                return
            if bounds.deadline is None and bounds.grace_end is None:
                continue  # nothing to watch the clock for yet
            now = clock()  # read once a poll
            since, bounds.since = bounds.since, now
            step = 0.0 if since is None else now - since
            if bounds.time_up(now):
                bounds.over = bounds.over or "time"  # set before the abort: the loop reads it after
                break
            if bounds.waited(step):
                break  # the answer is whole: only what it waited for (the usage, [DONE]) is lost
        if not finished.is_set():
            stream.abort()

    def start() -> None:  # only ever called from the thread reading the answer
        nonlocal started
        if started is None:
            started = start_worker(watch, "remote-watch")

    if watching:
        start()
    bounds._watch = start
    try:
        yield
    finally:
        bounds._watch = None
        finished.set()
        if own and started is not None:  # gone with its answer, not a poll later (finished: it aborts nothing)
            cancel.set()
            started.join()
