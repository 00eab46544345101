"""Streaming an answer to the terminal, and the console it goes to.

`MarkdownStream` prints each finished Markdown block once, as soon as it is finished, and keeps
only the unfinished tail in a live region (`LiveTail`, live_tail.py) redrawn in place: long answers
scroll like normal output and the screen never redraws the whole answer. Which part is finished is
decided by `BlockSplitter` (markdown_blocks.py), a line at a time; a frame renders at most the end
of a long unfinished block, so each token costs the same however long the answer. The Markdown
itself is `AnswerMarkdown` (answer_markdown.py). Redraws of the tail are at most `refresh_interval_s`
apart: a delta that comes sooner is drawn by the next feed or, if none comes in time (a server
pausing, a slow next token), at the interval's end by the stream's drawer thread (one an answer,
not one a frame: during fast streaming nearly every frame is a late one; it ends after IDLE_S with
nothing to draw, and at `finish`). `PlainStream` writes the raw text for pipes, `--plain` and
`TERM=dumb`. The one-line summaries around an answer are summary_lines.py's.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import nullcontext, suppress
from typing import IO, TYPE_CHECKING, Any, Mapping

from rich.console import Console, Group, RenderableType
from rich.text import Text

from ..numbers import parse_int
from ..threads import start_worker
from .live_tail import LiveTail
from .markdown_blocks import BlockSplitter

if TYPE_CHECKING:
    from rich.markdown import Markdown

    from ..settings import UISettings

# Top-level elements that rich renders with a blank line of their own before them.
_BRING_OWN_BLANK_LINE = ("bullet_list_open", "ordered_list_open", "blockquote_open", "table_open")

LIVE_TAIL_CHARS = 4000  # of an unfinished block, rendered in the live tail (its end; more fills no screen)
LIVE_TAIL_SCREENS = 2  # the live tail renders at most this many screen heights of the block's last lines
IDLE_S = 2.0  # a drawer thread with no throttled tail to draw for this long ends (the next one starts another)


class MarkdownStream:
    """Render a streamed answer as Markdown: finished blocks printed once, the tail live."""

    def __init__(self, console: Console, *, code_theme: str = "monokai", refresh_interval_s: float = 1 / 15):
        self.console = console
        self.code_theme = code_theme
        self.refresh_interval_s = refresh_interval_s
        self._chunks: list[str] = []
        self._splitter = BlockSplitter()
        self._printed_blocks = 0
        self._after_rule = False
        self._live: LiveTail | None = None
        self._last_refresh = 0.0
        self._use_live = console.is_interactive  # a terminal: not a file given colours (make_console)
        # feed() and finish() run in the app's thread, a deferred redraw in the drawer's
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        # (token, seconds) while a throttled tail waits to be drawn; the token is new each time
        self._pending: tuple[object, float] | None = None
        self._drawer: threading.Thread | None = None  # draws a throttled tail late (`_draw_late`)
        self._finished = False

    @property
    def text(self) -> str:
        """Everything fed so far."""
        return "".join(self._chunks)

    def feed(self, delta: str) -> None:
        if not delta:
            return
        with self._lock:
            self._chunks.append(delta)
            blocks = self._splitter.feed(delta)
            for block in blocks:
                self._print_block(block)
            self._show_tail(force=bool(blocks))

    def finish(self) -> str:
        """Stop the live region and print what is left; returns the whole text. Safe to call twice."""
        with self._lock:
            self._finished = True
            self._pending = None
            self._cond.notify_all()  # the drawer ends (one drawing now has the lock first: it is done)
            try:
                self._print_block(self._splitter.take_tail())
            except BaseException:  # the terminal gone: the region (its Ctrl-Z hook) is closed all the
                self._close_live(after_error=True)  # same, the print's error the one raised
                raise
            self._close_live()
            return self.text

    def _close_live(self, after_error: bool = False) -> None:
        live, self._live = self._live, None
        if live is not None:
            with suppress(Exception) if after_error else nullcontext():
                live.close()

    def __enter__(self) -> MarkdownStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()

    def _markdown(self, text: str) -> tuple[RenderableType, Markdown]:
        from .answer_markdown import AnswerMarkdown  # with rich's parser and highlighter: only once an answer streams

        markdown = AnswerMarkdown(text.strip("\n"), code_theme=self.code_theme)
        # Rendered as one document, rich puts a blank line between top-level elements, except
        # before a list, quote or table (which bring their own) and after a rule; blocks printed one
        # by one get the same spacing here.
        first = markdown.parsed[0].type if markdown.parsed else ""
        if self._printed_blocks and not self._after_rule and first not in _BRING_OWN_BLANK_LINE:
            return Group(Text(""), markdown), markdown
        return markdown, markdown

    def _print_block(self, block: str) -> None:
        if not block.strip():
            return
        if self._live is not None:
            self._live.clear()  # the block takes the tail's place; the tail is drawn again below it
        view, markdown = self._markdown(block)
        self.console.print(view)
        self._printed_blocks += 1
        self._after_rule = bool(markdown.parsed) and markdown.parsed[-1].type == "hr"

    def _show_tail(self, force: bool) -> None:
        if not self._use_live:
            return
        now = time.monotonic()
        # a region not yet drawn is drawn now, never late: its first draw opens its Ctrl-Z hook,
        # which only the main thread can (signal handlers are set there)
        live = self._live is not None and self._live.active
        resized = live and self._live.size != self.console.size
        wait = self._last_refresh + self.refresh_interval_s - now
        if live and not force and not resized and wait > 0:
            # re-rendering Markdown per token is the cost to avoid: the next feed catches up, or
            # the drawer does if none comes in time (an answer that pauses showed stale text)
            if self._pending is None:
                self._pending = (object(), wait)
                if self._drawer is None:
                    # one thread an answer: a Timer a frame started ~15 threads a second, each
                    # start() waiting in the app's thread for the new thread to run. Its process
                    # signals blocked (threads.py): one it took (a Ctrl-C, a Ctrl-Z) waited for the
                    # app's read to end, a server's next piece
                    self._drawer = start_worker(self._draw_late, "internvl-chat-tail")
                else:
                    self._cond.notify_all()
            return
        self._pending = None  # drawn now: a drawer waiting for it finds nothing to do
        self._last_refresh = now
        if self._splitter.blank:
            if self._live is not None:
                self._live.clear()
            return
        if self._live is None:
            self._live = LiveTail(self.console)
        # only the tail's last rows are shown: past LIVE_TAIL_CHARS (or two screens of lines), only
        # its end is rendered (each frame rendering all of a long tail, a list or code block not yet
        # finished, took time quadratic in the answer); the whole block is printed once it is finished
        splitter, max_lines = self._splitter, LIVE_TAIL_SCREENS * self.console.size.height
        if splitter.chars <= LIVE_TAIL_CHARS and splitter.lines <= max_lines:
            text = splitter.tail
        else:
            text = splitter.preview(LIVE_TAIL_CHARS, max_lines)
        self._live.draw(self._markdown(text)[0])

    def _draw_late(self) -> None:
        """The drawer thread: each tail a feed left throttled is drawn at its interval's end, unless
        drawn (or the answer finished) since; it ends at finish(), or after IDLE_S with none."""
        me = threading.current_thread()
        with self._cond:
            try:
                while not self._finished:
                    pending = self._pending
                    if pending is None:
                        if not self._cond.wait(IDLE_S) and self._pending is None:
                            return
                        continue
                    self._cond.wait(pending[1])  # woken early by finish(), or by a new tail once this one was drawn
                    if self._finished or self._pending is not pending:
                        continue
                    self._pending = None
                    try:
                        self._show_tail(force=True)
                    except Exception:  # noqa: BLE001
                        # the terminal gone or closed, or a rendering failure: here a traceback would
                        # land in the answer; the app's own next feed or finish meets it and says so
                        pass
            finally:
                if self._drawer is me:
                    self._drawer = None


class PlainStream:
    """Raw text deltas to a file, flushed as they come (pipes, --plain, TERM=dumb)."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._chunks)

    def feed(self, delta: str) -> None:
        if not delta:
            return
        self._chunks.append(delta)
        self.file.write(delta)
        self.file.flush()

    def finish(self) -> str:
        """End the answer's line (once); returns the whole text."""
        if self._chunks and not self._chunks[-1].endswith("\n"):
            self._chunks.append("\n")
            self.file.write("\n")
            self.file.flush()
        return self.text

    def __enter__(self) -> PlainStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


MAX_TERMINAL_CELLS = 10_000  # columns or lines: far past any screen


def _no_size(value: str) -> bool:
    """A COLUMNS or LINES value that names no terminal size: 0, more than any screen holds, or no
    number (`²` passed rich's isdigit() and int() raised: a traceback at start)."""
    try:
        return not 0 < parse_int(value) <= MAX_TERMINAL_CELLS
    except ValueError:
        return True


def make_console(file: IO[str] | None = None, color: str = "auto", env: Mapping[str, str] = os.environ) -> Console:
    """A Console for `file` honouring the ui.color setting and NO_COLOR (any non-empty value).

    `color` "always" into a file or pipe gives colours and Markdown, but the console is not
    interactive (`is_interactive`): no spinner and no live tail, whose cursor moves and erasures
    only a terminal undoes (a `--script` transcript held every frame of every answer).

    COLUMNS or LINES of 0 (set where the size is unknown) count as unset: rich took COLUMNS=0 as a
    width of 0 and printed nothing at all, so a script's transcript was lost with status 0. So do
    values past any screen (`_no_size`): rich padded each line of an answer to COLUMNS=99999999999
    and failed with MemoryError, a traceback.

    Into a file or pipe, FORCE_COLOR (or TTY_COMPATIBLE=1, as CI runners set) counts as "always"
    when the setting is "auto"; never more: rich took either as a terminal, so a transcript held
    spinner frames and erasures, and --plain or NO_COLOR still wrote bold and dim escapes."""
    no_color = colour_off(color, env)
    tty = _isatty(sys.stdout if file is None else file)
    env_forced = env.get("FORCE_COLOR", "") != "" or env.get("TTY_COMPATIBLE") == "1"
    colour_anyway = not no_color and (color == "always" or color == "auto" and env_forced)
    if tty:
        force_terminal, interactive = (True if color == "always" and not no_color else None), None
    else:  # decided here, not by rich from the environment
        force_terminal, interactive = colour_anyway, False
    environ = {k: v for k, v in env.items() if not (k in ("COLUMNS", "LINES") and _no_size(v))}
    return Console(file=file, no_color=no_color, force_terminal=force_terminal, force_interactive=interactive,
                   _environ=environ)  # fmt: skip


def ui_console(file: IO[str], ui: UISettings) -> Console:
    """The console of the REPL and of `--script` for the ui settings now: ui.plain makes it as
    ui.color = never does (no escapes at all into a pipe). Whether a console is a terminal, and its
    colours, are fixed when it is made, so `/set plain` makes it again (App.remake_console)."""
    return make_console(file, color="never" if ui.plain else ui.color)


def colour_off(color: str, env: Mapping[str, str] = os.environ) -> bool:
    """No colours: the ui.color setting says never, or NO_COLOR is set (any non-empty value)."""
    return color == "never" or bool(env.get("NO_COLOR"))


def _isatty(file: IO[str]) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):  # no such method, or a closed file
        return False


def choose_stream(
    console_or_file: Console | IO[str], plain: bool, env: Mapping[str, str] = os.environ
) -> MarkdownStream | PlainStream:
    """Markdown for a real terminal; raw text for --plain, non-terminals and TERM=dumb."""
    dumb = env.get("TERM", "").lower() == "dumb"
    if isinstance(console_or_file, Console):
        console = console_or_file
        if plain or dumb or console.is_dumb_terminal or not console.is_terminal:
            return PlainStream(console.file)
        return MarkdownStream(console)
    file = console_or_file
    isatty = getattr(file, "isatty", None)
    if plain or dumb or not (isatty and isatty()):
        return PlainStream(file)
    return MarkdownStream(make_console(file, env=env))
