"""Keys typed while the app is busy (an answer streams, a model loads) go to the next prompt.

A terminal in its normal (cooked) mode echoes every key at the cursor, into the answer being
drawn, and keeps the typed line for whoever reads next: prompt_toolkit then gets the text with
its Enter as a newline, which starts a continuation line. `held_keys()` turns echo and line
editing off while the app works (Ctrl-C still interrupts), takes what was typed when the work is
done, and restores the terminal exactly as it was on every path (after a Ctrl-Z and `fg`, its
quiet modes are put back: the shell set its own). `TypeAhead.text` is what the
next prompt starts with; `typed_text()` turns the raw bytes into it.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

try:
    import termios
except ImportError:  # not a POSIX terminal: there is nothing to hold
    termios = None  # type: ignore[assignment]

# Escape sequences a key sends (arrows, function keys, Alt+key): they edit, they are not text.
_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|O.|[^\[O])?")
_ERASE_CHAR = ("\x7f", "\x08")
_KILL_LINE = "\x15"  # Ctrl-U
_ERASE_WORD = "\x17"  # Ctrl-W


def typed_text(raw: bytes) -> str:
    """The text a person meant by these key bytes: escape sequences and control keys dropped,
    Backspace, Ctrl-U and Ctrl-W applied, Enter as a line break, a final Enter removed."""
    text = _ESCAPE.sub("", raw.decode("utf-8", errors="replace")).replace("\r\n", "\n").replace("\r", "\n")
    out: list[str] = []
    for ch in text:
        if ch in _ERASE_CHAR:
            if out and out[-1] != "\n":
                out.pop()
        elif ch == _KILL_LINE:
            while out and out[-1] != "\n":
                out.pop()
        elif ch == _ERASE_WORD:
            while out and out[-1] in " \t":
                out.pop()
            while out and out[-1] not in " \t\n":
                out.pop()
        elif ch in "\n\t" or (ch >= " " and ch != "\x7f" and not "\x80" <= ch <= "\x9f"):
            out.append(ch)
    return "".join(out).rstrip("\n")


@dataclass
class TypeAhead:
    text: str = ""


_holds: list[tuple[int, list, list]] = []  # (fd, saved, quiet) of the holds in force, innermost last


_in_force: list = []  # [fd, modes]: what the holds last set, put back after a stop (Ctrl-Z, `fg`)


def _set_modes(fd: int, modes: list) -> None:
    termios.tcsetattr(fd, termios.TCSANOW, modes)
    _in_force[:] = [fd, modes]


def _reapply_after_stop(signum: int, frame) -> None:
    """SIGCONT: a shell that stopped the program (Ctrl-Z) put its own modes on the terminal, and
    `fg` does not bring ours back; without this, keys typed after `fg` echoed into the answer."""
    if not _holds or not _in_force:
        return
    fd, modes = _in_force
    try:
        if os.tcgetpgrp(fd) == os.getpgrp():  # in the background (`bg`) the terminal is not ours
            termios.tcsetattr(fd, termios.TCSANOW, modes)
    except (OSError, termios.error):
        pass


@contextmanager
def keys_released() -> Iterator[None]:
    """Inside `held_keys`, the terminal as it was (echo, line editing): for a question asked in
    the middle of a command, such as a confirmation read with input()."""
    if not _holds:
        yield
        return
    fd, saved, quiet = _holds[-1]
    _set_modes(fd, saved)
    try:
        yield
    finally:
        _set_modes(fd, quiet)


def _pending(fd: int) -> bytes:
    chunks = []
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@contextmanager
def held_keys(stream=None) -> Iterator[TypeAhead]:
    """While the block runs, the terminal on `stream` (default stdin) neither echoes keys nor
    edits lines; afterwards `TypeAhead.text` holds what was typed. No-op when not a terminal."""
    stream = sys.stdin if stream is None else stream
    held = TypeAhead()
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd) if termios is not None and os.isatty(fd) else None
    except (AttributeError, ValueError, OSError, termios.error if termios else OSError):
        saved = None
    if saved is None:
        yield held
        return
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)  # ISIG stays: Ctrl-C still sends SIGINT
    quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 1, 0
    on_cont = _watch_sigcont()
    hold = (fd, saved, quiet)
    # the modes change inside the try, and they are put back before anything else that calls: a
    # SIGTERM whose handler raised there (the REPL's SystemExit) skipped the restore, no echo left
    try:
        _holds.append(hold)
        _set_modes(fd, quiet)
        yield held
    finally:
        try:
            held.text = typed_text(_pending(fd))
        except OSError:
            pass
        finally:  # also when Ctrl-C lands while the keys are read
            try:
                _set_modes(fd, saved)
            finally:
                if _holds and _holds[-1] is hold:
                    _holds.pop()
                if on_cont is not None:
                    signal.signal(signal.SIGCONT, on_cont)


def _watch_sigcont():
    """Install the SIGCONT handler (main thread only); returns the one to put back, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGCONT, _reapply_after_stop)
