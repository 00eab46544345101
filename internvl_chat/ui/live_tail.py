"""A region at the bottom of the output, redrawn in place: `LiveTail`, where render.py shows an
answer's unfinished tail (safe on resize; erased on Ctrl-Z and drawn again on `fg`)."""

from __future__ import annotations

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.control import Control
from rich.segment import Segment

from .suspend import HIDE_CURSOR, SHOW_CURSOR, StopHook, terminal_lock


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
        with terminal_lock:  # drawn from render.py's drawer thread too: never between a Ctrl-Z's writes
            self._frame, self._shown, self._erased_for_stop = frame, True, False
            self._write(self._ERASE_BELOW + self._AUTOWRAP_OFF + frame + self._AUTOWRAP_ON)

    def clear(self) -> None:
        """Erase the region; the cursor is left where the region began (printing goes on there)."""
        if self.active:
            with terminal_lock:
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
