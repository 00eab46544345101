"""Ctrl-Z and `fg` while the spinner or an answer's live region is up (ui/suspend.py), in this
process: SIGCONT is sent for real (harmless to a running program), the stop itself is recorded
instead of made. The end-to-end checks with a shell's job control are in test_repl_pty.py."""

from __future__ import annotations

import io
import os
import signal

import pytest
from rich.console import Console

from internvl_chat.ui import suspend
from internvl_chat.ui.live_tail import LiveTail
from internvl_chat.ui.render import MarkdownStream
from internvl_chat.ui.spinner import spin
from internvl_chat.ui.suspend import HIDE_CURSOR, SHOW_CURSOR, StopHook
from test_render import emulate_terminal

SIGNALS = (signal.SIGTSTP, signal.SIGCONT)


@pytest.fixture
def stops(monkeypatch):
    """The stops Ctrl-Z would make (recorded, not made); the handlers must be as they were after the test."""
    before = [signal.getsignal(s) for s in SIGNALS]
    made: list[str] = []
    monkeypatch.setattr(suspend, "_stop_now", lambda: made.append("stopped"))
    yield made
    assert [signal.getsignal(s) for s in SIGNALS] == before
    assert not suspend._open


def _terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=60, height=20, force_terminal=True, color_system=None), out


def test_nested_hooks_write_innermost_first_before_a_stop_and_outermost_first_after_it(stops):
    console, out = _terminal()
    earlier: list[str] = []
    previous_cont = signal.signal(signal.SIGCONT, lambda signum, frame: earlier.append("modes"))  # typeahead.py's
    try:
        outer = StopHook(console, lambda: "<outer stop>", lambda: "<outer cont>")
        inner = StopHook(console, lambda: "<inner stop>", lambda: "<inner cont>")
        with outer, inner:
            os.kill(os.getpid(), signal.SIGTSTP)
            assert stops == ["stopped"]
            # continued: the stop's handler has done SIGCONT's work already (SIGCONT can be late)
            assert out.getvalue() == "<inner stop><outer stop><outer cont><inner cont>"
            assert earlier == ["modes"]
            out.truncate(0), out.seek(0)
            os.kill(os.getpid(), signal.SIGCONT)
            assert out.getvalue() == "<outer cont><inner cont>" and earlier == ["modes", "modes"]
        out.truncate(0), out.seek(0)
        os.kill(os.getpid(), signal.SIGCONT)  # all closed: only the handler that was there
        assert out.getvalue() == "" and earlier == ["modes"] * 3
        assert signal.getsignal(signal.SIGTSTP) is not suspend._on_stop
    finally:
        signal.signal(signal.SIGCONT, previous_cont)


def test_hooks_closed_out_of_order_leave_the_handlers_as_they_were(stops):
    console, _ = _terminal()
    first = StopHook(console, lambda: "", lambda: "")
    second = StopHook(console, lambda: "", lambda: "")
    first.open(), second.open()
    first.close()
    assert signal.getsignal(signal.SIGTSTP) is suspend._on_stop  # the second still needs it
    second.close()
    second.close()  # twice: nothing more
    StopHook(console, lambda: "", lambda: "").close()  # never opened: nothing


def test_ctrl_z_while_the_spinner_spins_shows_the_cursor_and_fg_hides_it(stops):
    console, out = _terminal()
    with spin(console, "thinking …"):
        out.truncate(0), out.seek(0)
        os.kill(os.getpid(), signal.SIGTSTP)
        shown = out.getvalue()
    assert shown.index(SHOW_CURSOR) < shown.rindex(HIDE_CURSOR)
    assert stops == ["stopped"]


@pytest.mark.parametrize("name", ["m[/x]", "m[red]"])
def test_the_spinner_shows_a_file_name_as_it_is(stops, name):
    """`--model 'models/m[/x]'` (or a video, a session file so named) raised rich's MarkupError while
    loading; `[red]` coloured the line."""
    console, out = _terminal()
    with spin(console, f"loading {name} …"):
        pass
    assert f"loading {name} …" in out.getvalue()


def test_ctrl_z_erases_the_live_region_and_fg_draws_its_last_frame_again(stops):
    console, out = _terminal()
    tail = LiveTail(console)
    tail.draw("an unfinished paragraph")
    drawn = emulate_terminal(out.getvalue())
    os.kill(os.getpid(), signal.SIGTSTP)
    stopped = out.getvalue()
    assert stopped.endswith("\r\x1b[J\x1b[?7h" + SHOW_CURSOR + HIDE_CURSOR + "\r\x1b[J\x1b[?7l" + tail._frame + "\x1b[?7h")
    assert emulate_terminal(stopped) == drawn  # where the shell's lines would have been, the same frame
    os.kill(os.getpid(), signal.SIGCONT)  # the late SIGCONT: the cursor hidden again, nothing drawn twice
    assert out.getvalue() == stopped + HIDE_CURSOR
    tail.close()
    assert out.getvalue().endswith(SHOW_CURSOR)


class _StoppedAsTheWriteReturns(io.StringIO):
    """A terminal on which Ctrl-Z is handled right after a frame has been written, before the
    line after the write runs (what a busy machine does when the key comes as the frame shows)."""

    stop_after: str | None = None  # the stop comes when a write that ends with this has been flushed
    armed_at = 0

    def arm(self, stop_after: str) -> None:
        self.stop_after, self.armed_at = stop_after, len(self.getvalue())

    def flush(self) -> None:
        super().flush()
        text = self.getvalue()
        if self.stop_after and len(text) > self.armed_at and text.endswith(self.stop_after):
            self.stop_after = None
            suspend._on_stop(signal.SIGTSTP, None)


def test_ctrl_z_as_a_frames_write_returns_erases_it_and_fg_draws_it_again(stops):
    out = _StoppedAsTheWriteReturns()
    console = Console(file=out, width=60, height=20, force_terminal=True, color_system=None)
    tail = LiveTail(console)
    try:
        tail.draw("an unfinished paragraph")
        out.arm("\x1b[?7h")  # the end of the next frame's write
        tail.draw("an unfinished paragraph that went on")
        assert stops == ["stopped"]
        written = out.getvalue()
        frame = "\r\x1b[J\x1b[?7l" + tail._frame + "\x1b[?7h"
        assert written.endswith(frame + "\r\x1b[J\x1b[?7h" + SHOW_CURSOR + HIDE_CURSOR + frame)  # erased, drawn again
        assert emulate_terminal(written) == "an unfinished paragraph that went on"
    finally:
        tail.close()


def test_ctrl_z_while_the_region_is_cleared_erases_nothing_printed(stops):
    """Between clear() and the next frame, finished blocks are printed at the cursor: a stop then
    only turns autowrap and the cursor back on, and `fg` hides the cursor (the next frame draws)."""
    console, out = _terminal()
    with MarkdownStream(console, refresh_interval_s=0) as stream:
        stream.feed("First para")
        stream._live.clear()
        before = out.getvalue()
        os.kill(os.getpid(), signal.SIGTSTP)
        assert out.getvalue() == before + "\x1b[?7h" + SHOW_CURSOR + HIDE_CURSOR
        stream.feed(".\n\nSecond")
    assert emulate_terminal(out.getvalue()) == "First para.\n\nSecond"
