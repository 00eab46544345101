"""The spinner shown while the app works ("thinking …", "loading …") and the cursor it hides.

rich's status hides the terminal's cursor while it spins and shows it again when it stops. A
Ctrl-Z in between stopped the program with the cursor hidden: the shell, and whatever ran there
before `fg`, had none. While a spinner runs, SIGTSTP now shows the cursor before the program
stops, and SIGCONT hides it again (in the foreground only: after `bg` the terminal is not ours),
as typeahead.py puts its terminal modes back.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.status import Status

SHOW_CURSOR, HIDE_CURSOR = "\x1b[?25h", "\x1b[?25l"

_spinning: list[Console] = []  # consoles whose cursor a running spinner hides, innermost last


@contextmanager
def spin(console: Console, text: str) -> Iterator[Status]:
    """rich's status line with `text` while the block runs; yields it (`update` changes the text)."""
    status = console.status(text, spinner="dots")
    handlers, depth = _install(), len(_spinning)
    try:  # not `with status`: a Ctrl-C inside its start would leave it spinning over the prompt
        status.start()
        _spinning.append(console)
        yield status
    finally:
        del _spinning[depth:]
        status.stop()
        _restore(handlers)


def _install():
    """SIGTSTP and SIGCONT handlers (main thread only); returns the ones to put back, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    before = signal.getsignal(signal.SIGCONT)

    def on_cont(signum: int, frame) -> None:
        if callable(before):  # typeahead.py's: its terminal modes
            before(signum, frame)
        _cursor(HIDE_CURSOR, foreground_only=True)

    return signal.signal(signal.SIGTSTP, _stop_with_cursor_shown), signal.signal(signal.SIGCONT, on_cont)


def _restore(handlers) -> None:
    if handlers is not None:
        signal.signal(signal.SIGTSTP, handlers[0])
        signal.signal(signal.SIGCONT, handlers[1])


def _stop_with_cursor_shown(signum: int, frame) -> None:
    """SIGTSTP (Ctrl-Z): the cursor back on, then stopped as by default."""
    _cursor(SHOW_CURSOR)
    mine = signal.signal(signal.SIGTSTP, signal.SIG_DFL)
    try:
        os.kill(os.getpid(), signal.SIGTSTP)  # the program stops here; SIGCONT (`fg`) goes on
    finally:
        signal.signal(signal.SIGTSTP, mine)


def _cursor(sequence: str, foreground_only: bool = False) -> None:
    """Written to the terminal directly: rich's own writes may wait in a buffer of its."""
    for console in list(_spinning):
        try:
            fd = console.file.fileno()
            if foreground_only and os.tcgetpgrp(fd) != os.getpgrp():
                continue
            console.file.write(sequence)
            console.file.flush()
        except (OSError, ValueError):
            pass
