"""`--script FILE` (or `-` for stdin): REPL input without a terminal, printed as a transcript.

Each entry is echoed as `>>> line` (continuation lines of a `\"\"\"` block as `... line`), then
its output follows, exactly as the REPL would show it. Blank lines and lines starting with `#`
are skipped (a message that starts with # goes inside a `\"\"\"` block). A script with nothing
else (an empty file) is refused before the model loads, exit status 2, as an empty prompt is.
A failing line prints its one-line error and the script goes on; the exit status is 1 when any
line failed (the failed line numbers go to stderr), else 0. `/exit` ends the script early.
Attachments still waiting for a message when it ends are named in a warning on stderr; the status
stays as it was (no line failed: a script may attach only to see the cost with /context).
Ctrl-C ends it with status 130, SIGTERM and SIGHUP with 143 and 129 (one line says which). Stdin is read only for `--script -` (or media flags naming it);
text piped to a script FILE is said in a warning on stderr (the run goes on), not dropped silently.

The script is read as untrusted text (a regular file under the size limit, or stdin). A line that
is not UTF-8 fails on its own, like any bad line; binary data (an image given as the script) is
refused with what to do instead. Relative media paths are looked up in the script's folder
first, then in the working folder, so a script and its pictures can travel together.

When stdout cannot be written (a full disk) the script still runs to its end, so the files its
lines save are written, and then fails with status 1; a reader that goes away (`| head`) ends it.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..chat.session import Media
from ..chat.session_file import SESSION_FORMAT
from ..errors import UsageError
from ..files import (OutputFailed, expand_home, read_bytes_file, read_stream, refuse_web_address, refuse_wide_text, sniff_binary,
                     undecodable_byte, visible)
from ..numbers import counted
from ..settings import Settings
from .app import ERROR, EXIT, App, media_names, unsent_note
from .commands import BLOCK_QUOTES, block_is_open
from .paths import quote_path
from .render import ui_console
from .setup import media_from_flags, open_conversation


@dataclass(frozen=True)
class Entry:
    line_number: int  # of the entry's first line, 1-based
    text: str  # what App.handle_line gets (a whole block for \"\"\")
    lines: tuple[str, ...]  # as written, for the transcript


def read_entries(text: str) -> Iterator[Entry]:
    """Split a script into entries: single lines, and `\"\"\"` blocks spanning lines."""
    if "\r" in text and "\n" not in text:  # classic Mac line ends (CR alone): a line each, not one message
        text = text.replace("\r", "\n")
    lines = [line.removesuffix("\r") for line in text.split("\n")]  # only \n ends a line (not \f, U+2028 …)
    if text.endswith("\n"):
        lines.pop()  # the last line's end starts no line: an unclosed block echoed an empty "... " line
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        start = i
        i += 1
        if not stripped or stripped.startswith("#"):
            continue
        if block_is_open(stripped):
            block = [line]
            while i < len(lines):
                block.append(lines[i])
                i += 1
                if lines[i - 1].rstrip().endswith(BLOCK_QUOTES):
                    break
            yield Entry(start + 1, "\n".join(block), tuple(block))
        else:
            yield Entry(start + 1, line, (line,))


def _script_name(name: str) -> str:
    """`the script chat.txt`, `the script on stdin`: the script as an error names it (shown inert)."""
    return "the script on stdin" if name == "-" else f"the script {visible(str(expand_home(name)))}"


def _read_script(name: str) -> str:
    """The script's text; bytes that are not UTF-8 stay as surrogates, so only their lines fail."""
    if name == "-":
        data, shown = read_stream(sys.stdin.fileno(), "the script on stdin"), "on stdin"
    else:
        refuse_web_address(name)  # as a Path it lost a slash: "script https:/example.com/… does not exist"
        path = expand_home(name)
        if _is_pipe(path):  # `--script <(…)` or /dev/stdin: a pipe is read from stdin, never opened by name
            raise UsageError(f"the script {visible(str(path))} is a pipe, not a file; give the script on stdin "
                             "instead: --script - (… | internvl-chat --script -)")  # fmt: skip
        data, shown = read_bytes_file(path, "script"), visible(str(path))
    refuse_wide_text(data, f"the script {shown}")  # its NUL bytes read as binary data
    kind = sniff_binary(data)
    if kind is not None:
        raise UsageError(f"the script {shown} is {kind}, not text; a script holds REPL lines "
                         "(attach pictures with /image PATH in it, or --image FILE)")  # fmt: skip
    text = data.decode("utf-8", errors="surrogateescape")
    text = text[1:] if text.startswith("\ufeff") else text
    if text.lstrip().startswith("{") and f'"{SESSION_FORMAT}"' in text[:1000]:  # each JSON line would be sent as a message
        raise UsageError(f"the script {shown} is a session file saved with /save, not REPL lines; load it with "
                         f"/load {quote_path(name)} (in the REPL, or as a script line)")  # fmt: skip
    return text


def _is_pipe(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False  # read_bytes_file says what is wrong


def script_folder(name: str) -> Path | None:
    """The folder relative media paths in the script are looked up in first (None for stdin)."""
    return None if name == "-" else Path(os.path.abspath(expand_home(name))).parent


def _undecodable_line(entry: Entry) -> tuple[int, int] | None:
    """(line number, byte) of the entry's first line that is not UTF-8, or None."""
    for k, line in enumerate(entry.lines):
        bad = undecodable_byte(line)
        if bad is not None:
            return entry.line_number + k, bad
    return None


@dataclass
class UnsentBy:
    """The last message that failed while attachments waited for one: its line, and those attachments."""

    line: int
    pending: tuple[Media, ...]


def run_entries(app: App, entries: Iterator[Entry]) -> tuple[list[int], str | None, UnsentBy | None]:
    """Run entries as a transcript; returns the line numbers of the entries that failed, the
    command that ended the script early as written (`/bye`), None where it ran to its end, and the
    last message that failed with attachments waiting, while any of them still wait."""
    failed: list[int] = []
    unsent: UnsentBy | None = None
    for n, entry in enumerate(entries):
        if n:
            app.say("")
        app.say(f">>> {visible(entry.lines[0])}", "bold")  # the script's text cannot drive the terminal
        for line in entry.lines[1:]:
            app.say(f"... {visible(line)}", "bold")
        bad = _undecodable_line(entry)
        if bad is not None:
            app.error(f"line {bad[0]} is not UTF-8 text (byte 0x{bad[1]:02x}); save the script as UTF-8")
            failed.append(entry.line_number)
            continue
        result = app.handle_line(entry.text)
        if result == ERROR:
            failed.append(entry.line_number)
            if app.failed_message is not None and app.pending:  # a message failed: they were not sent with it
                unsent = UnsentBy(entry.line_number, tuple(app.pending))
        if unsent is not None and not any(m is u for m in app.pending for u in unsent.pending):
            unsent = None  # a later message took them (or /drop, /clear dropped them)
        if result == EXIT:
            return failed, entry.text.split()[0], unsent
    return failed, None, unsent


class _Transcript:
    """stdout for the transcript: after a write error (other than a reader gone) output is dropped
    and the error kept, so the script's remaining lines (a /save) still run."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self.failed: OutputFailed | None = None

    def write(self, text: str) -> int:
        return self._guard(lambda: self._stream.write(text), len(text))

    def flush(self) -> None:
        self._guard(self._stream.flush, None)

    def _guard(self, action, dropped):
        if self.failed is not None:
            return dropped
        try:
            return action()
        except OutputFailed as e:
            if e.errno == errno.EPIPE:
                raise
            self.failed = e
            return dropped

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def run_script(args: argparse.Namespace, settings: Settings, stdin_unread: bool = False) -> int:
    """`stdin_unread`: text waits on stdin, which a script FILE never reads (cli.py decides)."""
    text = _read_script(args.script)  # before loading the model: a wrong path fails fast
    entries = list(read_entries(text))
    if not entries:  # it ran, printed nothing and ended 0: an empty file or a wrong one is a mistake
        raise UsageError(f"{_script_name(args.script)} holds no messages or commands (only blank lines and # comments); "
                         "nothing was sent; write REPL lines in it, one a line")  # fmt: skip
    if stdin_unread:  # it was ignored without a word: the user meant it for the messages
        print("internvl-chat: warning: stdin is not read with --script FILE (its lines are the messages); put the "
              'text in the script (inside a """ block), or pipe the script itself: --script -', file=sys.stderr)
    transcript = _Transcript(sys.stdout)
    session = open_conversation(settings)
    app = App(session, settings, ui_console(transcript, settings.ui), interactive=False)  # type: ignore[arg-type]
    app.remake_console = lambda: ui_console(transcript, settings.ui)  # type: ignore[arg-type]
    folder = script_folder(args.script)
    if folder is not None:
        app.search_dirs = (folder,)
    app.attach(media_from_flags(session, args, settings))
    failed, ended_by, unsent = run_entries(app, iter(entries))
    transcript.flush()
    if app.pending:  # what they attached would vanish without a word
        print(f"internvl-chat: warning: {_unsent_warning(app.pending, ended_by, unsent)}", file=sys.stderr)
    if transcript.failed is not None:
        raise transcript.failed
    if failed:
        print(f"internvl-chat: {failed_lines_note(failed)}", file=sys.stderr)
        return 1
    return 0


def _unsent_warning(pending: Sequence[Media], ended_by: str | None, unsent: UnsentBy | None = None) -> str:
    """The warning for attachments no message took: the message that would have taken them failed
    (`unsent`), or the script ended, or `ended_by` (`/bye`) ended it, before one (it said "the
    script ended before one" after a /bye too, and after a message line that failed)."""
    them = "it" if len(pending) == 1 else "them"
    if unsent is not None:
        what = f"{len(pending)} attachment was" if len(pending) == 1 else f"{len(pending)} attachments were"
        said = f"{what} never sent ({media_names(pending)}): the message on line {unsent.line}"
        if all(any(m is u for u in unsent.pending) for m in pending):
            return f"{said} that would take {them} failed (its error says why)"
        # some were attached after it, and no message came for those either
        ended = "the script ended" if ended_by is None else f"{visible(ended_by)} came"
        return f"{said} failed (its error says why), and {ended} before another"
    if ended_by is None:
        return unsent_note(pending, "the script ended", f"add a message line after {them}")
    command = visible(ended_by)
    return unsent_note(pending, f"{command} came", f"add a message line between {them} and {command}")


FAILED_LINES_SHOWN = 10  # line numbers the summary names; a script of 682 failing lines listed them all


def failed_lines_note(failed: list[int]) -> str:
    """The summary of the failed lines: their count, the first few numbers and how many more."""
    where = ", ".join(str(n) for n in failed[:FAILED_LINES_SHOWN])
    more = f" and {len(failed) - FAILED_LINES_SHOWN:,} more" if len(failed) > FAILED_LINES_SHOWN else ""
    return f"{counted(len(failed), 'script line')} failed ({'line' if len(failed) == 1 else 'lines'} {where}{more})"
