"""The spinner shown while the app works ("thinking …", "loading …") and the cursor it hides.

rich's status hides the terminal's cursor while it spins and shows it again when it stops. A
Ctrl-Z in between stopped the program with the cursor hidden: the shell, and whatever ran there
before `fg`, had none. While a spinner runs, Ctrl-Z shows the cursor before the program stops,
and `fg` hides it again (suspend.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.status import Status
from rich.text import Text

from ..files import GLYPHS_OR_ESCAPES, can_encode
from ..threads import process_signals_blocked
from .suspend import HIDE_CURSOR, SHOW_CURSOR, StopHook


def spinner_name(console: Console) -> str:
    """rich's braille "dots", or "line" (`-\\|/`) where the output's encoding cannot hold them
    (PYTHONIOENCODING=ascii, LC_ALL=C without UTF-8 mode): each frame came out as an escape, `\\u280b`."""
    return "dots" if can_encode(console.encoding, "\u280b\u2819\u2839\u2838\u283c\u2834\u2826\u2827\u2807\u280f") else "line"


@contextmanager
def spin(console: Console, text: str) -> Iterator[Status]:
    """rich's status line with `text` while the block runs; yields it (`update` changes the text).

    `text` is shown as it is, never as rich markup: it names files ("loading m[/x] …"), and a
    bracket there raised MarkupError (a traceback) or restyled the line."""
    if not can_encode(console.encoding, text):  # "thinking ...", "caf\\xe9" measured as written (its live row's height)
        text = text.encode(console.encoding, GLYPHS_OR_ESCAPES).decode(console.encoding)
    status = console.status(Text(text), spinner=spinner_name(console))
    hook = StopHook(console, before_stop=lambda: SHOW_CURSOR, after_continue=lambda: HIDE_CURSOR)
    try:  # not `with status`: a Ctrl-C inside its start would leave it spinning over the prompt
        hook.open()  # first: a Ctrl-Z inside the start, once it has hidden the cursor, shows it
        # rich's refresh thread leaves the process's signals to this one (threads.py): a Ctrl-C
        # or Ctrl-Z it took, while the app waited in a read for a server's first piece, was
        # handled only once that piece came
        with process_signals_blocked():
            status.start()
        yield status
    finally:
        hook.close()  # before the stop: a `fg` from now on must not hide the cursor again
        status.stop()
