"""What the REPL leaves on a real terminal's screen: pexpect drives it, pyte models the screen.

The screen models are pyte's (rows kept as they are on resize, like xterm) and `ReflowScreen`
(rows re-wrapped on resize, like most terminals). To act "while an answer streams" without
racing it, the program is stopped (SIGSTOP) once the screen shows the answer growing, everything
it wrote so far is read, then keys are typed or the window resized, and it is continued.
Waits are for screen contents or markers, never for a time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pexpect
import pyte
import pytest
from process_helpers import interrupt_stopped, resume, stop
from screen_model import make_screen
from test_repl_pty import pty_env

PROMPT_READY = "\x1b[?2004h"  # prompt_toolkit turns bracketed paste on when it waits for input
INPUT_DONE = "\x1b[?2004l"
TIMEOUT = 120
STATS = re.compile(r"tok/s")


class Terminal:
    """The REPL in a pseudo-terminal whose output drives a screen model."""

    def __init__(self, home: Path, model: Path, *args: str, rows: int = 40, cols: int = 80, reflow: bool = False):
        self.screen = make_screen(cols, rows, reflow)
        self.stream = pyte.Stream(self.screen)
        env = pty_env(home)
        env.pop("COLUMNS", None)
        env.pop("LINES", None)
        argv = ["-m", "internvl_chat.cli", "--model", str(model), "--device", "cpu", "--no-history", *args]
        self.child = pexpect.spawn(sys.executable, argv, env=env, dimensions=(rows, cols), encoding="utf-8",
                                   timeout=TIMEOUT, cwd=str(home))  # fmt: skip
        self.raw: list[str] = []
        self.seen = {PROMPT_READY: 0, INPUT_DONE: 0}  # markers already waited for
        terminal = self

        class Feed:
            def write(self, data: str) -> None:
                terminal.raw.append(data)
                terminal.stream.feed(data)

            def flush(self) -> None:
                pass

        self.child.logfile_read = Feed()
        self.prompt()

    # ---- the screen ----------------------------------------------------------------------

    def rows(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.rows())

    def wait_for(self, predicate, what: str) -> None:
        """Read output until `predicate(rows)` holds (or the program ends)."""
        while not predicate(self.rows()):
            try:
                self.child.read_nonblocking(65536, timeout=TIMEOUT)
            except pexpect.TIMEOUT:
                raise AssertionError(f"never saw {what}; the screen:\n{self.text()}") from None
            except pexpect.EOF:
                raise AssertionError(f"the program ended before {what}; the screen:\n{self.text()}") from None

    def _next(self, marker: str) -> None:
        """Wait for the next `marker` in the output after the last one waited for."""
        self.wait_for(lambda rows: "".join(self.raw).count(marker) > self.seen[marker], repr(marker))
        self.seen[marker] += 1

    def prompt(self) -> None:
        self._next(PROMPT_READY)

    def enter(self, line: str) -> None:
        """Type a line and Enter; wait until it is accepted."""
        self.child.send(line + "\r")
        self._next(INPUT_DONE)

    # ---- stopping the program mid-answer ----------------------------------------------------

    def pause(self) -> None:
        """Stop the program and read everything it wrote: the screen is then exactly its output."""
        stop(self.child.pid)
        while True:
            try:
                self.child.read_nonblocking(65536, timeout=1)  # a stopped program writes nothing more
            except pexpect.TIMEOUT:
                return

    def resume(self) -> None:
        resume(self.child.pid)

    def resize(self, rows: int, cols: int) -> None:
        self.screen.resize(rows, cols)
        self.child.setwinsize(rows, cols)

    def close(self) -> int:
        while True:
            try:
                self.child.read_nonblocking(65536, timeout=TIMEOUT)
            except pexpect.EOF:
                break
        self.child.close()
        return self.child.exitstatus


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


def answer_rows(rows: list[str], question: str) -> list[str]:
    """The rows below the line that asked `question` (the answer so far)."""
    start = max(i for i, row in enumerate(rows) if row.startswith("> " + question[:20]))
    return [row for row in rows[start + 1 :] if row.strip()]


def streaming(question: str, min_rows: int = 1, min_chars: int = 24):
    """A screen predicate: the answer to `question` is on screen and still growing."""

    def check(rows: list[str]) -> bool:
        if not any(row.startswith("> " + question[:20]) for row in rows):
            return False
        body = answer_rows(rows, question)
        return (len(body) >= min_rows and sum(len(squeeze(r)) for r in body) >= min_chars
                and not any("thinking" in r or STATS.search(r) for r in body))  # fmt: skip

    return check


def finished(rows: list[str]) -> bool:
    return any(STATS.search(row) for row in rows)


def still_streaming(term: Terminal) -> bool:
    """The answer is still being drawn: its live region hides the cursor until the stream ends
    (the cursor is shown again before the notes and the stats line are printed)."""
    return term.screen.cursor.hidden and not finished(term.rows())


QUESTION = "Tell me a long story."
ATTEMPTS = 5


def stopped_mid_answer(home: Path, model: Path, *args: str, growing=None, **kw) -> Terminal:
    """The REPL stopped (SIGSTOP) while its answer to QUESTION streams. The tiny model answers in
    a fraction of a second, so on a busy machine the answer can end between the screen showing it
    growing and the stop (its stats line not printed yet, or printed), or before this process reads
    the screen in between at all (the whole answer in one read): such a run is dropped and a new one
    started, never acted on."""
    growing = growing or streaming(QUESTION)
    for _ in range(ATTEMPTS):
        term = Terminal(home, model, *args, **kw)
        term.enter(QUESTION)
        term.wait_for(lambda rows: growing(rows) or finished(rows), "the answer streaming")
        if not finished(term.rows()):
            term.pause()
            if still_streaming(term):
                return term
        term.child.terminate(force=True)
    raise AssertionError(f"the answer ended before the program could be stopped, {ATTEMPTS} times")


def test_ctrl_c_mid_answer_draws_the_partial_answer_once(tiny_original, tmp_path):
    term = stopped_mid_answer(tmp_path, tiny_original, "--max-new-tokens", "1500", cols=80,
                              growing=streaming(QUESTION, min_chars=30))  # fmt: skip
    first = squeeze(answer_rows(term.rows(), QUESTION)[0])[:12]
    assert interrupt_stopped(term.child)  # Ctrl-C, through the terminal driver (its echo included)
    term.resume()
    term.wait_for(lambda rows: any("[cancelled" in r for r in rows) and finished(rows), "the cancel note")
    term.prompt()
    assert squeeze(term.text()).count(first) == 1, term.text()
    assert "^C" not in term.text()
    term.child.sendcontrol("d")
    assert term.close() == 0


@pytest.mark.parametrize("reflow", [True, False], ids=["reflowing", "xterm-like"])
@pytest.mark.parametrize("new_cols", [50, 110])
def test_resize_while_streaming_leaves_no_stale_line(tiny_original, tmp_path, reflow, new_cols):
    term = stopped_mid_answer(tmp_path, tiny_original, "--max-new-tokens", "200", rows=60, cols=80, reflow=reflow,
                              growing=streaming(QUESTION, min_rows=2, min_chars=90))  # fmt: skip
    before = [squeeze(row)[:12] for row in answer_rows(term.rows(), QUESTION) if len(squeeze(row)) >= 12]
    term.resize(60, new_cols)
    term.resume()
    term.wait_for(finished, "the end of the answer")
    term.prompt()
    screen = squeeze(term.text())
    for piece in before:  # every row of the answer is on the screen once: none was left behind
        assert screen.count(piece) == 1, (piece, term.text())
    term.child.sendcontrol("d")
    assert term.close() == 0


def test_keys_typed_while_answering_wait_in_the_next_prompt(tiny_original, tmp_path):
    term = stopped_mid_answer(tmp_path, tiny_original, "--max-new-tokens", "400", cols=80)
    term.child.send("And then whaX\x7ft?\r")  # typed ahead, with a Backspace, and Enter
    term.resume()
    term.wait_for(finished, "the end of the answer")
    term.prompt()
    term.wait_for(lambda rows: any(r.startswith("> And then what?") for r in rows), "the typed text in the prompt")
    rows = term.rows()
    prompt_row = max(i for i, r in enumerate(rows) if r.startswith("> "))
    assert rows[prompt_row] == "> And then what?"  # the whole line, in the prompt, not sent yet
    assert not any("And then" in r for r in rows[:prompt_row])  # never echoed into the answer
    assert not any(r.strip() for r in rows[prompt_row + 1 :])  # no continuation line
    term.enter("")  # Enter sends it
    term.wait_for(lambda rows: sum(bool(STATS.search(r)) for r in rows) == 2, "the second answer")
    term.prompt()
    term.enter(f"/save {tmp_path / 'talk.json'}")
    term.prompt()
    term.child.sendcontrol("d")
    assert term.close() == 0
    users = [m["text"] for m in json.loads((tmp_path / "talk.json").read_text())["messages"] if m["role"] == "user"]
    assert users == [QUESTION, "And then what?"]


@pytest.mark.parametrize("cols", [40, 60, 80])
def test_everything_printed_fits_the_width(tiny_original, tmp_path, cols):
    """No line the app prints is wrapped by the terminal (it wraps its own, at word boundaries)."""
    term = Terminal(tmp_path, tiny_original, "--max-new-tokens", "8", rows=200, cols=cols, reflow=True)
    for line in ["/help", "/help video", "Hi there.", "/context", "/stats", "/set temperature", "/set nothing 3",
                 f"/image {tmp_path / 'no such picture.png'}", "/imgae"]:  # fmt: skip
        term.enter(line)
        term.prompt()
    wrapped = [y for y in range(term.screen.lines) if getattr(term.screen.buffer[y], "wrapped", False)]
    assert not wrapped, "\n".join(f"{'>' if y in wrapped else ' '} {row}" for y, row in enumerate(term.rows()))
    words = " ".join(term.text().split())
    assert "at most, after the next answer" in words and "tok/s" in words and "did you mean /image?" in words
    term.child.sendcontrol("d")
    assert term.close() == 0


def _terminal_modes(term: Terminal) -> dict[str, bool]:
    import termios

    lflag = termios.tcgetattr(term.child.child_fd)[3]  # the pty's modes, as the next program finds them
    return {"echo": bool(lflag & termios.ECHO), "line editing": bool(lflag & termios.ICANON),
            "Ctrl-C": bool(lflag & termios.ISIG)}  # fmt: skip


@pytest.mark.parametrize("when", ["at the prompt", "mid-answer"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_killed_by_a_signal_the_terminal_is_restored(tiny_original, tmp_path, sig, when):
    """`kill` or a closed window ends the program, but never leaves the terminal raw or silent."""
    if when == "mid-answer":  # (an answer that ended before the signal would test the prompt again)
        term = stopped_mid_answer(tmp_path, tiny_original, "--max-new-tokens", "1500", cols=80)
        os.kill(term.child.pid, sig)
        term.resume()
    else:
        term = Terminal(tmp_path, tiny_original, "--max-new-tokens", "1500", cols=80)
        os.kill(term.child.pid, sig)
    with pytest.raises(pexpect.EOF):  # everything it wrote until it ended
        while True:
            term.child.read_nonblocking(65536, timeout=TIMEOUT)
    modes = _terminal_modes(term)  # read while the pty is still open (close() would drop it)
    term.close()
    assert modes == {"echo": True, "line editing": True, "Ctrl-C": True}
    raw = "".join(term.raw)
    assert raw.rfind(INPUT_DONE) > raw.rfind(PROMPT_READY)  # bracketed paste is off again
    assert "Traceback" not in raw, raw[-2000:]
