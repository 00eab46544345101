"""Streaming an answer to the terminal, and the one-line summaries around it.

`MarkdownStream` prints each finished Markdown block once, as soon as it is finished, and keeps
only the unfinished tail in a live region (`LiveTail`) redrawn in place: long answers scroll like
normal output and the screen never redraws the whole answer. Which part is finished is decided by
`BlockSplitter`, a line at a time; a frame renders at most the end of a long unfinished block, so
each token costs the same however long the answer. The Markdown itself is `AnswerMarkdown`
(answer_markdown.py). `PlainStream` writes the raw text for pipes, `--plain` and `TERM=dumb`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Mapping

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.control import Control
from rich.segment import Segment
from rich.text import Text

from ..files import visible
from .suspend import HIDE_CURSOR, SHOW_CURSOR, StopHook

if TYPE_CHECKING:
    from rich.markdown import Markdown

    from ..settings import UISettings

# --- block splitting ---------------------------------------------------------------------------

_FENCE_OPEN = re.compile(r"^(\s*)(`{3,}|~{3,})")
_LIST_ITEM = re.compile(r"^ {0,3}(?:[-*+]|\d{1,9}[.)])(?:[ \t]|$)")
_HEADING = re.compile(r"^ {0,3}#{1,6}(?:[ \t]|$)")
_THEMATIC_BREAK = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_LIST_CONTINUATION_INDENT = 2  # a line indented this much after a blank line stays in the list
# Top-level elements that rich renders with a blank line of their own before them.
_BRING_OWN_BLANK_LINE = ("bullet_list_open", "ordered_list_open", "blockquote_open", "table_open")


def _indent(line: str) -> int:
    expanded = line.expandtabs(4)
    return len(expanded) - len(expanded.lstrip(" "))


def _partial_ends_list(partial: str) -> bool | None:
    """After a list and a blank line, does this unfinished line start something else?
    True / False, or None while too little of it is there to tell."""
    partial = partial.rstrip("\r")  # a \r may be the first half of the line's \r\n
    if not partial.strip(" \t"):
        return None
    if _indent(partial) >= _LIST_CONTINUATION_INDENT:
        return False
    body = partial.lstrip(" \t")
    if body[0] in "-*+":
        return None if len(body) == 1 else body[1] not in " \t"
    digits = re.match(r"\d{1,9}", body)
    if digits:
        rest = body[digits.end() :]
        if not rest:
            return None
        if rest[0] not in ".)":
            return True
        return None if len(rest) == 1 else rest[1] not in " \t"
    return True


_HEAD_CHARS = 16  # of an unfinished line: all `_partial_ends_list` needs (an indent of 2, a 9-digit number)


class BlockSplitter:
    """Split streamed Markdown into finished blocks and the unfinished tail, a delta at a time.

    A block is finished when nothing typed later can change how it renders: a paragraph at its
    blank line, a heading at the end of its line, a fenced code block at its closing fence (blank
    lines inside it never split it), a list only when the first line after it starts something
    that is not part of the list. Blocks keep their newlines; what was fed is the blocks, in
    order, then `tail`. Each line is looked at once, when it ends: splitting the whole tail again
    on every token took time quadratic in a long block (a 30,000-token list or code block).
    """

    def __init__(self) -> None:
        self._lines: list[str] = []  # the tail's finished lines
        self._partial: list[str] = []  # pieces of its unfinished last line
        self._head = ""  # the first _HEAD_CHARS characters of that line
        self.chars = 0  # the length of the tail
        self._blank_lines = True  # the tail's finished lines hold only whitespace
        self._blank_partial = True
        self._has_content = self._is_list = self._blank_after_list = False
        self._fence: tuple[str, int, bool] | None = None  # (char, length, is the whole block)
        self._fence_line = ""  # the line that opened it

    @property
    def blank(self) -> bool:
        """The tail holds only whitespace."""
        return self._blank_lines and self._blank_partial

    @property
    def tail(self) -> str:
        return "".join(self._lines) + self._partial_text()

    def feed(self, delta: str) -> list[str]:
        """The blocks `delta` finished."""
        blocks: list[str] = []
        start = 0
        while (newline := delta.find("\n", start)) >= 0:
            line = self._partial_text() + delta[start : newline + 1]
            self._partial, self._head, self._blank_partial = [], "", True
            self.chars += newline + 1 - start
            self._take_line(line, blocks)
            start = newline + 1
        rest = delta[start:]
        if rest:
            self._partial.append(rest)
            self._head = (self._head + rest[:_HEAD_CHARS])[:_HEAD_CHARS]
            self._blank_partial = self._blank_partial and not rest.strip()
            self.chars += len(rest)
        if self._fence is None and self._is_list and self._blank_after_list and _partial_ends_list(self._head):
            self._cut(blocks)
        return blocks

    def take_tail(self) -> str:
        """The tail, which is then empty (the answer has ended)."""
        tail = self.tail
        self.__init__()  # type: ignore[misc]  # all state back to the start
        return tail

    @property
    def lines(self) -> int:
        """The tail's finished lines."""
        return len(self._lines)

    def preview(self, max_chars: int, max_lines: int) -> str:
        """The end of the tail, at most `max_chars` long and `max_lines` finished lines (with the
        line that opened a code block it ends in): enough to show its last rows. It starts at the
        first line start (or space, in one long line) past points that move by half of either
        bound at a time, so the rows shown are not wrapped differently on every frame."""
        step = max(max_chars // 2, 1)
        start = -(-(self.chars - max_chars) // step) * step  # rounded up: what is kept fits
        line_step = max(max_lines // 2, 1)
        first_line = -(-(len(self._lines) - max_lines) // line_step) * line_step
        partial = self._partial_text()
        at = self.chars - len(partial)  # where the partial line starts in the tail
        if at < start:
            space = partial.find(" ", start - at)
            kept = [partial[space + 1 if space >= 0 and space - (start - at) < step else start - at :]]
        else:
            kept = [partial]
            for index in range(len(self._lines) - 1, max(first_line, 0) - 1, -1):
                at -= len(self._lines[index])
                if at < start:
                    break
                kept.append(self._lines[index])
        if self._fence is not None and len(kept) <= len(self._lines):  # the opening line was left out
            kept.append(self._fence_line)
        return "".join(reversed(kept))

    def _partial_text(self) -> str:
        if len(self._partial) > 1:
            self._partial = ["".join(self._partial)]
        return self._partial[0] if self._partial else ""

    def _cut(self, blocks: list[str]) -> None:
        """The tail's finished lines are a block (if they hold one)."""
        if self._lines and self._has_content:
            block = "".join(self._lines)
            blocks.append(block)
            self._lines, self._blank_lines = [], True
            self.chars -= len(block)
        self._has_content = self._is_list = self._blank_after_list = False

    def _add(self, line: str, content: str) -> None:
        self._lines.append(line)
        self._blank_lines = self._blank_lines and not content.strip()

    def _take_line(self, line: str, blocks: list[str]) -> None:
        content = line.rstrip("\n").rstrip("\r")
        if self._fence is not None:
            char, length, whole_block = self._fence
            self._add(line, content)
            stripped = content.strip(" \t")
            if stripped.startswith(char * length) and not stripped.strip(char):
                self._fence = None
                if whole_block:
                    self._has_content = True
                    self._cut(blocks)
            return
        if not content.strip(" \t"):
            if self._has_content and not self._is_list:
                self._add(line, content)
                self._cut(blocks)
                return
            if self._is_list:
                self._blank_after_list = True
            self._add(line, content)
            return

        indent = _indent(content)
        item = _LIST_ITEM.match(content) is not None
        opener = _FENCE_OPEN.match(content)
        starts_block = opener is not None or _HEADING.match(content) is not None
        starts_block = starts_block or _THEMATIC_BREAK.match(content) is not None
        if self._is_list:
            if self._blank_after_list and not item and indent < _LIST_CONTINUATION_INDENT:
                self._cut(blocks)
            elif not self._blank_after_list and starts_block and indent < _LIST_CONTINUATION_INDENT:
                self._cut(blocks)  # a fence or heading at the margin ends the list (else: lazy continuation)
            else:
                self._blank_after_list = False

        if opener is not None:
            if not self._is_list:
                self._cut(blocks)  # the paragraph before the fence is finished
            self._fence = (opener.group(2)[0], len(opener.group(2)), not self._is_list)
            self._fence_line = line
            self._has_content = True
            self._add(line, content)
        elif _HEADING.match(content) and not self._is_list:
            self._cut(blocks)
            self._has_content = True
            self._add(line, content)
            self._cut(blocks)
        else:
            self._is_list = self._is_list or item
            self._has_content = True
            self._add(line, content)


# --- streams -----------------------------------------------------------------------------------

LIVE_TAIL_CHARS = 4000  # of an unfinished block, rendered in the live tail (its end; more fills no screen)
LIVE_TAIL_SCREENS = 2  # the live tail renders at most this many screen heights of the block's last lines


class _BottomLines:
    """Show only the last lines of a renderable that fit the terminal (a live region taller
    than the screen cannot be redrawn)."""

    def __init__(self, renderable: RenderableType) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options, pad=False)
        keep = max(console.size.height - 2, 1)
        for line in lines[-keep:]:
            yield from _rstrip(line)
            yield Segment.line()


def _rstrip(line: list[Segment]) -> list[Segment]:
    """A rendered line without its trailing padding (a row filled with spaces would be rewrapped
    by a terminal that reflows on resize)."""
    line = list(line)
    while line and not line[-1].control and not line[-1].text.rstrip(" "):
        line.pop()
    if line and not line[-1].control:
        last = line[-1]
        line[-1] = Segment(last.text.rstrip(" "), last.style)
    return line


class LiveTail:
    """A region at the bottom of the output, redrawn in place (the answer's unfinished tail).

    Between redraws the cursor waits, hidden, at the region's top-left corner, so a redraw is
    "erase to the end of the screen, then draw". That survives what breaks a region redrawn from
    its bottom (rich's Live moves up by the height it drew): a terminal that reflows its lines on
    resize carries the cursor along with its line, one that does not leaves it in place, and a
    character echoed or printed at the cursor is erased with the region instead of pushing it down.
    A frame is drawn with autowrap off: one laid out for a width the window has just left (a
    resize between its layout and its write) is cut at the edge instead of wrapping onto rows the
    move back up does not count, and the next draw lays it out for the new width.

    A Ctrl-Z erases the region (the shell's lines take its place, none of it is left between them)
    and turns autowrap and the cursor back on before the program stops; `fg` hides the cursor and
    draws the last frame again where the shell left the cursor (suspend.py).
    """

    _ERASE_BELOW = "\r\x1b[J"
    _AUTOWRAP_OFF, _AUTOWRAP_ON = "\x1b[?7l", "\x1b[?7h"

    def __init__(self, console: Console) -> None:
        self.console = console
        self.active = False
        self.size = console.size  # what the last draw was laid out for
        self._frame = ""  # the last frame written whole
        self._shown = False  # it is on the screen, the cursor at its top-left corner
        self._erased_for_stop = False
        self._on_stop = StopHook(console, self._before_stop, self._after_continue)

    def draw(self, renderable: RenderableType) -> None:
        console = self.console
        if not self.active:
            self.active = True  # first: close() then closes what follows, whatever a Ctrl-C cut short
            self._on_stop.open()
            console.show_cursor(False)
        self.size = console.size
        lines = console.render_lines(_BottomLines(renderable), console.options, pad=False)
        console.begin_capture()
        try:
            console.print(_Lines(lines), soft_wrap=True, crop=False, overflow="ignore")
            console.control(Control.move_to_column(0), Control.move(0, -len(lines)))
        finally:
            frame = console.end_capture()
        # one write per frame: a resize (or a stop) never lands between a frame's lines, which a
        # reflowing terminal would rewrap with the cursor in the middle of the region
        # marked drawn before the write: a Ctrl-Z handled as the write returns (before a line after
        # it could run) must still erase it. Before the write the cursor is at the top-left of the
        # last frame, as after it, so erasing from there and drawing this frame after `fg` is
        # right either way (the write then draws it once more, in place)
        self._frame, self._shown, self._erased_for_stop = frame, True, False
        self._write(self._ERASE_BELOW + self._AUTOWRAP_OFF + frame + self._AUTOWRAP_ON)

    def clear(self) -> None:
        """Erase the region; the cursor is left where the region began (printing goes on there)."""
        if self.active:
            self._shown = self._erased_for_stop = False
            self._write(self._ERASE_BELOW)

    def close(self) -> None:
        """Erase the region for good and show the cursor again (autowrap too, should a signal
        have cut a frame's write short)."""
        if self.active:
            self._on_stop.close()  # first: a `fg` from now on must not hide the cursor or draw
            self._shown = self._erased_for_stop = False
            self._write(self._ERASE_BELOW + self._AUTOWRAP_ON)
            self.console.show_cursor(True)
            self.active = False

    def _before_stop(self) -> str:
        if not self._shown:  # the cursor may be anywhere in a frame or in printed text: keep it all
            return self._AUTOWRAP_ON + SHOW_CURSOR
        self._shown, self._erased_for_stop = False, True
        return self._ERASE_BELOW + self._AUTOWRAP_ON + SHOW_CURSOR

    def _after_continue(self) -> str:
        if not self._erased_for_stop:
            return HIDE_CURSOR
        self._shown, self._erased_for_stop = True, False
        return HIDE_CURSOR + self._ERASE_BELOW + self._AUTOWRAP_OFF + self._frame + self._AUTOWRAP_ON

    def _write(self, text: str) -> None:
        self.console.file.write(text)
        self.console.file.flush()


class _Lines:
    """Already rendered lines, printed as they are."""

    def __init__(self, lines: list[list[Segment]]) -> None:
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines:
            yield from line
            yield Segment.line()


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

    @property
    def text(self) -> str:
        """Everything fed so far."""
        return "".join(self._chunks)

    def feed(self, delta: str) -> None:
        if not delta:
            return
        self._chunks.append(delta)
        blocks = self._splitter.feed(delta)
        for block in blocks:
            self._print_block(block)
        self._show_tail(force=bool(blocks))

    def finish(self) -> str:
        """Stop the live region and print what is left; returns the whole text. Safe to call twice."""
        self._print_block(self._splitter.take_tail())
        if self._live is not None:
            self._live.close()
            self._live = None
        return self.text

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
        resized = self._live is not None and self._live.size != self.console.size
        if not force and not resized and now - self._last_refresh < self.refresh_interval_s:
            return  # re-rendering Markdown per token is the cost to avoid; the next feed catches up
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


def make_console(file: IO[str] | None = None, color: str = "auto", env: Mapping[str, str] = os.environ) -> Console:
    """A Console for `file` honouring the ui.color setting and NO_COLOR (any non-empty value).

    `color` "always" into a file or pipe gives colours and Markdown, but the console is not
    interactive (`is_interactive`): no spinner and no live tail, whose cursor moves and erasures
    only a terminal undoes (a `--script` transcript held every frame of every answer).

    COLUMNS or LINES of 0 (set where the size is unknown) count as unset: rich took COLUMNS=0 as a
    width of 0 and printed nothing at all, so a script's transcript was lost with status 0.

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
    environ = {k: v for k, v in env.items() if not (k in ("COLUMNS", "LINES") and v.strip().isdigit() and int(v) == 0)}
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


# --- summary lines -----------------------------------------------------------------------------


def _count(n: float) -> str:
    return f"{int(n):,}"


def _rate(per_s: float) -> str:
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}"


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 10 else f"{s:,.1f} s"


def percent(fraction: float) -> str:
    return f"{int(fraction * 100 + 0.5)} %"  # half up, unlike round()


def format_bytes(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


# Fields of the stats line, most wanted first: a narrow terminal drops them from the end.
_STATS_PRIORITY = ("decode", "context", "ttft", "server", "prefill", "vision", "peak")


def format_stats(
    timing: Mapping[str, Any] | None,
    usage: Mapping[str, Any] | None = None,
    context_used: int | None = None,
    context_limit: int | None = None,
    peak_mem_bytes: int | None = None,
    device: Any = None,
    width: int | None = None,
    approximate: bool = False,
) -> str:
    """One line after an answer; parts whose numbers are missing are left out.

    `vision 0.41 s · prefill 2,310 tok @ 5,120 tok/s · ttft 0.52 s · decode 41.3 tok/s ·
    context 2,480/8,192 (30 %) · peak 1.2 GiB GPU`. Vision is left out when it took no time
    (a text-only turn); decode tokens fall back to usage["completion_tokens"]. With `width`, the
    line fits it: the context shrinks to its percentage, then the least wanted fields go (peak,
    vision, prefill, ttft, context), and the decode rate stays. `approximate`: the context numbers
    are estimates (shown with ≈). A server's own numbers (`timing["server"]`) are labelled
    `server: prompt 812 tok (790 cached)`.
    """
    timing = timing or {}
    usage = usage or {}
    parts: dict[str, tuple[str, str]] = {}  # name -> (full, short)

    def add(name: str, full: str, short: str | None = None) -> None:
        parts[name] = (full, short or full)

    vision_s = timing.get("vision_s")
    if vision_s:
        add("vision", f"vision {_seconds(vision_s)}")

    prefill_tokens, prefill_s = timing.get("prefill_tokens"), timing.get("prefill_s")
    if prefill_tokens is not None:
        text = f"prefill {_count(prefill_tokens)} tok"
        if prefill_s:
            text += f" @ {_rate(prefill_tokens / prefill_s)} tok/s"
        add("prefill", text)
    elif prefill_s is not None:
        add("prefill", f"prefill {_seconds(prefill_s)}")

    if timing.get("ttft_s") is not None:
        add("ttft", f"ttft {_seconds(timing['ttft_s'])}")

    decode_rate = timing.get("decode_tokens_per_s")
    decode_tokens = timing.get("decode_tokens", usage.get("completion_tokens"))
    if decode_rate is None and decode_tokens is not None and timing.get("decode_s"):
        decode_rate = decode_tokens / timing["decode_s"]
    if decode_tokens == 0:
        pass  # one token, or one piece of a server's answer (cut by a kill): no decode to measure, not "0.0 tok/s"
    elif decode_rate is not None:
        add("decode", f"decode {_rate(decode_rate)} tok/s")
    elif decode_tokens is not None:
        add("decode", f"decode {_count(decode_tokens)} tok")

    about = "≈" if approximate else ""
    if context_used is not None and context_limit:
        share = percent(context_used / context_limit)
        add("context", f"context {about}{_count(context_used)}/{_count(context_limit)} ({share})", f"context {about}{share}")
    elif context_used is not None and approximate:
        add("context", f"context {about}{_count(context_used)}")

    server = timing.get("server") or {}
    if isinstance(server.get("prompt_tokens"), int):
        cached = server.get("cached_tokens")
        text = f"server: prompt {_count(server['prompt_tokens'])} tok"
        add("server", text + (f" ({_count(cached)} cached)" if isinstance(cached, int) else ""), text)

    if peak_mem_bytes:
        where = str(device or "")
        where = "GPU" if where.startswith("cuda") else "RAM" if where == "cpu" else where
        add("peak", f"peak {format_bytes(peak_mem_bytes)}" + (f" {where}" if where else ""))

    order = list(parts)  # display order
    kept = sorted(parts, key=_STATS_PRIORITY.index)
    while True:
        for form in (0, 1):
            line = " · ".join(parts[name][form] for name in order if name in kept)
            if width is None or cell_len(line) <= width or len(kept) <= 1:
                return line
        kept.pop()


# What a server reported about an answer (chat/remote.py `timing["server"]`), in /stats.
_SERVER_NUMBERS = (
    ("prompt_tokens", "prompt {:,} tokens"),
    ("cached_tokens", "{:,} cached"),
    ("completion_tokens", "answer {:,} tokens"),
    ("prompt_ms", "prompt {:,.0f} ms"),
    ("prompt_per_second", "prefill {:,.0f} tok/s"),
    ("predicted_per_second", "decode {:,.1f} tok/s"),
)


def format_server_numbers(server: Mapping[str, Any] | None) -> str:
    """`prompt 812 tokens · 790 cached · answer 12 tokens · decode 81.3 tok/s` (what is there)."""
    if not server:
        return ""
    parts = []
    for key, form in _SERVER_NUMBERS:
        value = server.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(form.format(value))
    if isinstance(server.get("finish_reason"), str):
        parts.append(f"finish {visible(server['finish_reason'])}")
    return " · ".join(parts)


# --- fitting text to the terminal ---------------------------------------------------------------

# A unit stays on the line of the number before it ("30 %", "0.41 s", "1.2 GiB").
_UNITS = frozenset({"%", "s", "ms", "KiB", "MiB", "GiB", "tok", "tok/s", "tokens", "tiles", "frames"})


def _words(line: str) -> list[tuple[str, str]]:
    """(word, the spaces after it); a unit is glued to the number before it."""
    words: list[tuple[str, str]] = []
    for match in re.finditer(r"(\S+)( *)", line):
        word, space = match.groups()
        if words and word.rstrip(".,;:)") in _UNITS and words[-1][0][-1:].isdigit() and words[-1][1] == " ":
            words[-1] = (words[-1][0] + " " + word, space)
        else:
            words.append((word, space))
    return words


def _cut(word: str, first: int, rest: int) -> list[str]:
    """A word wider than the line (a long path) in pieces: the first fits `first` cells, the others `rest`."""
    pieces, current, room = [], "", max(first, 1)
    for ch in word:
        if current and cell_len(current + ch) > room:
            pieces.append(current)
            current, room = "", max(rest, 1)
        current += ch
    return pieces + [current]


def wrap_text(text: str, width: int | None, indent: str | None = None) -> str:
    """`text` with each line broken at spaces to fit `width` cells (None: unchanged).

    Continuation lines get `indent` (default: the line's own indentation plus two spaces). Numbers
    and their units are never split; only a word longer than the line (a path) is cut.
    """
    if width is None:
        return text
    out: list[str] = []
    for line in text.split("\n"):
        if cell_len(line) <= width:
            out.append(line)
            continue
        lead = line[: len(line) - len(line.lstrip(" "))]
        more = indent if indent is not None else lead + "  "
        if cell_len(more) > width // 2:
            more = ""
        current, space = lead, ""
        for word, after in _words(line):
            if current.strip() and cell_len(current) + len(space) + cell_len(word) <= width:
                current += space + word
                space = after
                continue
            if current.strip():
                out.append(current)
                current = more
            room = width - cell_len(current)
            pieces = _cut(word, room, width - cell_len(more)) if cell_len(word) > room else [word]
            for piece in pieces[:-1]:
                out.append(current + piece)
                current = more
            current += pieces[-1]
            space = after
        out.append(current)
    return "\n".join(out)


def format_columns(rows: list[tuple[str, str]], width: int | None, *, indent: int = 0, gap: int = 2,
                   align_right: bool = False) -> str:  # fmt: skip
    """Label/value rows in two columns that fit `width`: long labels wrap in their column (or a
    value too wide for its column goes on its own line below the label, indented)."""
    if not rows:
        return ""
    pad = " " * indent
    label_width = max(cell_len(label) for label, _ in rows)
    value_width = max(cell_len(value) for _, value in rows)
    if width is not None:
        label_width = min(label_width, width - indent - gap - value_width)
    if width is None or label_width >= 12:
        lines = []
        for label, value in rows:
            label_lines = wrap_text(label, label_width, indent="  ").split("\n") if width is not None else [label]
            cell = value.rjust(value_width) if align_right else value
            first = label_lines[0] + " " * (label_width - cell_len(label_lines[0]))  # wide characters: two cells
            lines.append(f"{pad}{first}{' ' * gap}{cell}".rstrip())
            lines += [pad + extra for extra in label_lines[1:]]
        return "\n".join(lines)
    lines = []
    for label, value in rows:  # too narrow for two columns: the value under its label
        lines.append(wrap_text(pad + label, width))
        lines.append(wrap_text(pad + "    " + value, width))
    return "\n".join(lines)


def format_attach_line(
    kind: str,
    name: str | Path,
    size_or_frames: tuple[int, int] | int | str | None,
    tiles: int | None,
    tokens: int | None,
    context_fraction: float | None,
    approximate: bool = False,
) -> str:
    """`+ image cat.jpg 1920×1080 → 9 tiles · 2,304 tokens · context 14 %`.

    `size_or_frames`: (width, height) for an image, a frame count for a video (or any text).
    `approximate`: the token numbers are estimates (`≈2,304 tokens`).
    """
    about = "≈" if approximate else ""
    head = f"+ {kind} {name.name if isinstance(name, Path) else name}"
    if isinstance(size_or_frames, tuple):
        head += f" {size_or_frames[0]}×{size_or_frames[1]}"
    elif isinstance(size_or_frames, int):
        head += f" {size_or_frames} frame" + ("" if size_or_frames == 1 else "s")
    elif size_or_frames:
        head += f" {size_or_frames}"
    costs = []
    if tiles is not None:
        costs.append(f"{tiles} tile" + ("" if tiles == 1 else "s"))
    if tokens is not None:
        costs.append(f"{about}{_count(tokens)} tokens")
    if context_fraction is not None:
        costs.append(f"context {about}{percent(context_fraction)}")
    return head + (" → " + " · ".join(costs) if costs else "")
