"""`--script FILE` (or `-` for stdin): REPL input without a terminal, printed as a transcript.

Each entry is echoed as `>>> line` (continuation lines of a `\"\"\"` block as `... line`), then
its output follows, exactly as the REPL would show it. Blank lines and lines starting with `#`
are skipped (a message that starts with # goes inside a `\"\"\"` block).
A failing line prints its one-line error and the script goes on; the exit status is 1 when any
line failed (the failed line numbers go to stderr), else 0. `/exit` ends the script early.
Ctrl-C ends it with status 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..settings import Settings
from .app import BLOCK_QUOTES, ERROR, EXIT, App
from .render import make_console
from .setup import media_from_flags, open_session


@dataclass(frozen=True)
class Entry:
    line_number: int  # of the entry's first line, 1-based
    text: str  # what App.handle_line gets (a whole block for \"\"\")
    lines: tuple[str, ...]  # as written, for the transcript


def read_entries(text: str) -> Iterator[Entry]:
    """Split a script into entries: single lines, and `\"\"\"` blocks spanning lines."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        start = i
        i += 1
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith(BLOCK_QUOTES) and (len(stripped) < 6 or not stripped.endswith(BLOCK_QUOTES)):
            block = [line]
            while i < len(lines):
                block.append(lines[i])
                i += 1
                if lines[i - 1].rstrip().endswith(BLOCK_QUOTES):
                    break
            yield Entry(start + 1, "\n".join(block), tuple(block))
        else:
            yield Entry(start + 1, line, (line,))


def _read_script(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    path = Path(name).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"script {path} does not exist; check the --script path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read script {path} ({e}); pass a UTF-8 text file") from None


def run_entries(app: App, entries: Iterator[Entry]) -> list[int]:
    """Run entries as a transcript; returns the line numbers of the entries that failed."""
    failed: list[int] = []
    for n, entry in enumerate(entries):
        if n:
            app.say("")
        app.say(f">>> {entry.lines[0]}", "bold")
        for line in entry.lines[1:]:
            app.say(f"... {line}", "bold")
        result = app.handle_line(entry.text)
        if result == ERROR:
            failed.append(entry.line_number)
        elif result == EXIT:
            break
    return failed


def run_script(args: argparse.Namespace, settings: Settings) -> int:
    text = _read_script(args.script)  # before loading the model: a wrong path fails fast
    console = make_console(sys.stdout, color="never" if settings.ui.plain else settings.ui.color)
    session = open_session(settings)
    app = App(session, settings, console, interactive=False)
    app.attach(media_from_flags(session, args, settings))
    failed = run_entries(app, read_entries(text))
    sys.stdout.flush()
    if failed:
        where = ", ".join(str(n) for n in failed)
        print(f"internvl-chat: {len(failed)} script line(s) failed (line {where})", file=sys.stderr)
        return 1
    return 0
