"""Ctrl-X Ctrl-E: the prompt's text edited in $VISUAL / $EDITOR, then sent.

prompt_toolkit's own version encodes and decodes strict UTF-8 inside its event loop: a line
holding bytes that are not UTF-8 (typed in a Latin-1 terminal: they arrive as surrogates) or an
editor that saved Latin-1 raised UnicodeError there ("Unhandled exception in event loop", a
traceback, "Press ENTER to continue..."). Here such bytes go out and come back as they are
(surrogateescape), and the line is then refused by the app with one line, like any other input
that is not UTF-8. The temporary file is private and removed afterwards. What the editor leaves is
read back as a file we did not write (a regular file, size-limited); when it cannot be, the line
stays as it was and one line says why.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile

from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.document import Document

from ..errors import UsageError
from ..files import read_bytes_file, visible

_NO_BYTE = re.compile("[\ud800-\udc7f\udd00-\udfff]")  # surrogates that no byte was decoded to
_FALLBACK_EDITORS = ("editor", "nano", "vi")  # when neither $VISUAL nor $EDITOR is set


def encode_text(text: str) -> bytes:
    """UTF-8, with undecodable bytes (surrogates U+DC80..U+DCFF) written back as those bytes and
    any other lone surrogate as U+FFFD (no byte stands for it)."""
    return _NO_BYTE.sub("\ufffd", text).encode("utf-8", "surrogateescape")


def run_editor(path: str) -> str | None:
    """Run the user's editor on `path` in the foreground; None when it ended well, else why not
    (one line: a failed editor used to leave the line as it was without a word)."""
    chosen = [(f"${name}", os.environ[name]) for name in ("VISUAL", "EDITOR") if os.environ.get(name, "").strip()]
    # an editor the user chose that cannot run is said: a mistyped $EDITOR opened vi, which they had not chosen
    failure = None
    for source, command in chosen or [("", command) for command in _FALLBACK_EDITORS]:
        try:
            argv = shlex.split(command)
        except ValueError:  # an unclosed quote in $EDITOR
            failure = failure or (source, command, "an unclosed quote")
            continue
        if not argv:  # a line of only escaped spaces: no program named
            failure = failure or (source, command, "no program named")
            continue
        try:
            status = subprocess.call([*argv, path])
        except OSError as e:  # not installed, not executable
            failure = failure or (source, command, _why_not_run(e))
            continue
        if status == 0:
            return None
        return f"the editor ({visible(command)}) ended with status {status}; the line is as it was"
    if chosen and failure:
        source, command, why = failure
        return (f"the editor ({visible(command)}, from {source}) could not be run ({why}); set {source} to an installed "
                "editor; the line is as it was")
    return "no editor could be run (set $VISUAL or $EDITOR); the line is as it was"


def _why_not_run(error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return "not found"
    if isinstance(error, PermissionError):
        return "not executable"
    return visible(error.strerror or str(error))


async def edit_in_editor(buffer: Buffer, accept: bool = True) -> None:
    """Replace `buffer`'s text with what the editor leaves (one trailing newline dropped); then
    accept it, as Enter would, when `accept`. A failed editor leaves the text as it was."""
    try:
        fd, path = tempfile.mkstemp(prefix="internvl-chat-", suffix=".txt")  # mode 0600
    except OSError as e:  # no writable temporary folder ($TMPDIR, /tmp): raised here, it broke the prompt
        print(f"the editor needs a temporary file, which could not be made ({visible(e.strerror or str(e))}); set TMPDIR "
              "to a folder you can write; the line is as it was", file=sys.stderr, flush=True)  # fmt: skip
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_text(buffer.text))

        def edit() -> bool:
            failed = run_editor(path)
            if failed:
                print(failed, file=sys.stderr, flush=True)  # above the prompt, which then comes back
            return failed is None

        if not await run_in_terminal(edit, in_executor=True):
            return
        try:  # the editor may have removed it, or put a huge file or a link to a device in its place
            text = read_bytes_file(path, "the edited text").decode("utf-8", "surrogateescape")
        except UsageError as e:  # raised here, it broke the prompt ("Unhandled exception in event loop")
            print(f"{e}; the line is as it was", file=sys.stderr, flush=True)
            return
        text = text[:-1] if text.endswith("\n") else text
        buffer.document = Document(text, cursor_position=len(text))
        if accept:
            buffer.validate_and_handle()
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
