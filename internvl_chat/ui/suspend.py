"""Ctrl-Z (SIGTSTP) and `fg` (SIGCONT) while the app has put the terminal in a state of its own.

The spinner and an answer's live region hide the cursor while they are up (the live region also
turns autowrap off while it writes a frame). A Ctrl-Z then stopped the program with that state
on the terminal: the shell, and whatever ran there before `fg`, had no cursor. Each of them opens
a `StopHook` saying what to write before the program stops and after it goes on. While any is
open, SIGTSTP writes theirs (innermost first) and then stops the program as by default (or as
the handler it replaced does). SIGCONT, and the Ctrl-Z handler itself once the program goes on,
first run the handler SIGCONT had (typeahead.py's: the terminal modes), then write theirs
(outermost first), in the foreground only: after `bg` the terminal is not ours. What a hook
writes after a continue does no harm written twice. The handlers are installed when the first
hook opens and put back when the last one closes: nested hooks share them, and the chain of
handlers is left as it was.

A frame drawn from another thread (render.py's deferred redraw of a throttled tail) takes
`terminal_lock` around its write; the Ctrl-Z handler holds it from its first write until its
writes after `fg`, so no such frame lands between the erasure and the stop (the shell's lines
under a hidden cursor) or half-written around them.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console

SHOW_CURSOR, HIDE_CURSOR = "\x1b[?25h", "\x1b[?25l"

_open: list[StopHook] = []  # innermost last
terminal_lock = threading.RLock()  # the handler runs in the main thread, maybe inside a write it already holds
_replaced: list[Any] = []  # [SIGTSTP handler, SIGCONT handler] that ours replaced, while a hook is open


class StopHook:
    """`before_stop()` is written to `console`'s terminal just before a Ctrl-Z stops the program,
    `after_continue()` once `fg` has continued it, from `open()` until `close()` (main thread only:
    elsewhere it does nothing, as signal handlers can only be set there)."""

    def __init__(self, console: Console, before_stop: Callable[[], str], after_continue: Callable[[], str]) -> None:
        self.console = console
        self.before_stop = before_stop
        self.after_continue = after_continue

    def open(self) -> None:
        if self in _open or threading.current_thread() is not threading.main_thread():
            return
        _open.append(self)  # before the handlers: a Ctrl-C in between leaves nothing close() misses
        if len(_open) == 1:
            _install()

    def close(self) -> None:
        """Safe to call twice, or without open()."""
        if self in _open:
            _open.remove(self)
            if not _open:
                _uninstall()

    def __enter__(self) -> StopHook:
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def in_foreground(self) -> bool:
        try:
            return os.tcgetpgrp(self.console.file.fileno()) == os.getpgrp()
        except (AttributeError, OSError, ValueError):
            return True  # not a terminal another process group could own

    def write(self, text: str) -> None:
        """Straight to the file descriptor: the handler can run in the middle of the main thread's
        own write to the console's file, whose buffer refuses a second writer (and would hold the
        text back until after the stop)."""
        if not text:
            return
        file = self.console.file
        try:
            fd = file.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        try:
            if fd is None:  # an in-memory file (tests)
                file.write(text)
                file.flush()
                return
            data = text.encode(getattr(file, "encoding", None) or "utf-8", errors="replace")
            while data:
                data = data[os.write(fd, data) :]
        except (OSError, ValueError):
            pass


def _install() -> None:
    stop, cont = signal.getsignal(signal.SIGTSTP), signal.getsignal(signal.SIGCONT)
    _replaced[:] = [stop, cont]
    if stop is not signal.SIG_IGN:  # Ctrl-Z is meant to do nothing here: still nothing
        signal.signal(signal.SIGTSTP, _on_stop)
    signal.signal(signal.SIGCONT, _on_continue)


def _uninstall() -> None:
    stop, cont = _replaced
    _replaced.clear()
    signal.signal(signal.SIGTSTP, signal.SIG_DFL if stop is None else stop)  # None: not set from Python
    signal.signal(signal.SIGCONT, signal.SIG_DFL if cont is None else cont)


def _on_stop(signum: int, frame) -> None:
    with terminal_lock:
        for hook in reversed(_open):
            hook.write(hook.before_stop())
        previous = _replaced[0] if _replaced else signal.SIG_DFL
        if callable(previous):
            previous(signum, frame)
        else:
            _stop_now()
        # Continued. SIGCONT's own handler may run much later: the kernel can hand the signal to
        # another thread, and Python runs handlers only in this one, which meanwhile goes back to
        # waiting in a read (a server between two pieces of the answer). So its work is done now;
        # done again then, it changes nothing.
        _on_continue(signal.SIGCONT, frame)


def _stop_now() -> None:
    """Stopped as by default; `fg` (SIGCONT) goes on here."""
    mine = signal.signal(signal.SIGTSTP, signal.SIG_DFL)
    try:
        os.kill(os.getpid(), signal.SIGTSTP)
    finally:
        signal.signal(signal.SIGTSTP, mine)


def _on_continue(signum: int, frame) -> None:
    previous = _replaced[1] if _replaced else None
    if callable(previous):
        previous(signum, frame)
    with terminal_lock:
        for hook in list(_open):
            if hook.in_foreground():
                hook.write(hook.after_continue())
