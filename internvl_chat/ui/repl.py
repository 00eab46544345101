"""The interactive REPL: a prompt_toolkit front end for `App`.

Keys: Enter sends; Alt+Enter, Esc Enter and Ctrl-J add a line; a buffer that starts with `\"\"\"`
takes lines until the closing `\"\"\"`; Ctrl-X Ctrl-E edits the buffer in $EDITOR; Tab completes
slash commands, their arguments (setting keys, media paths filtered by extension, any path for
/save /export, saved session names and paths for /load) and media paths typed in a message;
Ctrl-C clears the line (and cancels
work while the model runs, see app.py); Ctrl-D on an empty line quits (attachments still waiting
for a message are named in a warning, never asked about), and on the empty last line of a
`\"\"\"` block ends the block as its closing `\"\"\"` does; Ctrl-Z suspends (`fg` resumes).
Bracketed paste is prompt_toolkit's default: a pasted text with newlines stays one input (app.py
runs the one-line commands it starts with one by one, and the rest as one message).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import stat
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from prompt_toolkit import PromptSession
from prompt_toolkit.application import create_app_session, get_app
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.key_binding.bindings.mouse import load_mouse_bindings
from prompt_toolkit.keys import Keys
from prompt_toolkit.layout.screen import Char
from prompt_toolkit.output import Output, create_output

from ..errors import InternVLChatError, UsageError
from ..files import (FORMAT_CHARS, WORKING_FOLDER_GONE, NoHomeFolder, can_encode, file_system_name, has_format_char, make_private_folders, name_as_text,
                     typed_as_utf8, visible, visible_lines, working_folder_gone)
from ..native_stderr import close_leftover_windows
from ..settings import SET_ALIASES, Settings
from .app import EXIT, App, unsent_note
from .commands import BLOCK_QUOTES, COMMAND_BY_NAME, COMMANDS, CommandSpec, block_is_open, split_words
from .editor import edit_in_editor
from .paths import IMAGE_EXTENSIONS, MEDIA_EXTENSIONS, SHARED_VIDEO_EXTENSIONS, VIDEO_EXTENSIONS, is_transport_stream, shell_unquote
from .render import ui_console
from .saved_sessions import default_sessions_dir, file_date, recent_sessions
from .set_keys import runtime_keys
from .setup import media_from_flags, open_conversation
from .typeahead import TypeAhead, held_keys, keys_released

_EXTENSIONS = {"image": IMAGE_EXTENSIONS, "video": VIDEO_EXTENSIONS, "media": MEDIA_EXTENSIONS, "file": None}
_PATH_STARTS = ("/", "~", "./", "../")
_ESCAPE = set(" \t'\"\\\n\r")  # a line break too: only a backslash keeps one inside a word


def _escape(path: str) -> str:
    return "".join("\\" + c if c in _ESCAPE else c for c in path)


# A menu of this many paths is already too long to read; a folder of 200,000 files made every Tab
# build 200,000 completions (seconds) and every redraw measure them all.
COMPLETION_LIMIT = 1000


def _path_text(full: str, quote: str, is_dir: bool) -> str:
    """`full` as it is inserted: typed back through `normalize_path` it names the same file."""
    if "\n" in full or "\r" in full:
        quote = ""  # only a backslash keeps a line break inside the word (a quoted one ends the path in a message)
    if quote == "'":
        body = full.replace("'", "'\\''")
    elif quote == '"':
        body = re.sub(r'([\\"$`])', r"\\\1", full)
    else:
        return _escape(full)
    return quote + body + ("" if is_dir else quote)


def _file_uri(path: str, is_dir: bool) -> str:
    """`path` (the file system's name: bytes that are not UTF-8 as surrogates) as a `file:` URI, its
    bytes %-escaped: all ASCII, so the REPL takes the line, and normalize_path reads it back as those
    bytes. Relative as typed (`file:shots/x%FF.png`); `//` kept from reading as a host."""
    body = quote(os.fsencode(path)) + ("/" if is_dir else "")
    return "file:" + ("//" if body.startswith("//") else "") + body


def complete_path(raw: str, kind: str, cwd: Path | None = None) -> Iterator[Completion]:
    """Completions of the partly typed path `raw` (as typed: quoted, escaped or plain).

    `kind`: "image", "video", "media" (either) or "file" (anything). Folders are always offered.
    The replacement keeps the user's quoting style and `~`; at most COMPLETION_LIMIT are offered.
    """
    quote = raw[0] if raw[:1] in ("'", '"') else ""
    try:
        typed = shell_unquote(raw + quote)  # a quote still open is closed to read what it holds
    except ValueError:
        typed = raw[1:] if quote else raw
    in_uri = typed[:5].lower() == "file:"  # one offered for a name that is not UTF-8 (a folder), completed further
    if in_uri:
        parts = urlsplit(typed)
        if parts.netloc not in ("", "localhost"):
            return
        typed = unquote(parts.path, errors="surrogateescape")  # as normalize_path reads it
    head, prefix = os.path.split(typed)
    # typed text is UTF-8 (prompt_toolkit reads it so); under an ASCII locale the file system's
    # names of its other characters are surrogates (file_system_name), and os calls refuse "ö" itself
    folder = Path(os.path.expanduser(file_system_name(head) or "."))
    if cwd is not None and not folder.is_absolute():
        folder = cwd / folder
    elif not folder.is_absolute() and working_folder_gone():  # it lists as empty: say why nothing is offered
        yield Completion(raw, start_position=-len(raw), display=f"{WORKING_FOLDER_GONE}: type a full path")
        return
    wanted = _EXTENSIONS[kind]
    hidden = prefix.startswith(".")
    matches: list[tuple[str, bool, bool]] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                name = name_as_text(entry.name)  # "nö.png" as typed, under an ASCII locale too (listed there with surrogates)
                as_uri = name is None  # not UTF-8: the app refuses any line holding its bytes, but reads them in a file: URI
                if as_uri:
                    name, typed_prefix = entry.name, file_system_name(prefix)
                else:
                    typed_prefix = prefix
                if not name.startswith(typed_prefix) or (name.startswith(".") and not hidden):
                    continue
                if has_format_char(name):  # a bidi or zero-width mark is no part of a name one means to pick
                    continue  # (`invoice\u202efdp.exe`), and U+2028 splits the word; typed or pasted (quoted) it still works
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    continue
                suffix = os.path.splitext(name)[1].lower()
                if is_dir or wanted is None or (suffix in wanted and (
                        suffix not in SHARED_VIDEO_EXTENSIONS or is_transport_stream(os.path.join(folder, entry.name)))):
                    matches.append((name, is_dir, as_uri))  # a .ts that is TypeScript source: no video
    except (OSError, ValueError):  # unreadable or vanished folder; a NUL in the typed text
        return
    matches.sort()
    for name, is_dir, as_uri in matches[:COMPLETION_LIMIT]:
        lead = head
        if not head and (name.startswith(("-", "~")) or name[:5].lower() == "file:"):
            lead = "."  # read as an option (`--x.png`), a home folder or a URI otherwise
        full = os.path.join(lead, name) + ("/" if is_dir else "")
        shown = visible(name) + ("/" if is_dir else "")  # a listed name is untrusted: no raw controls or bidi
        if as_uri or in_uri:
            text = _file_uri(os.path.join(file_system_name(lead), file_system_name(name)), is_dir)
        else:
            text = _path_text(full, quote, is_dir)
        yield Completion(text, start_position=-len(raw), display=shown)
    if len(matches) > COMPLETION_LIMIT:  # picking it changes nothing, and Tab then inserts no common part
        more = len(matches) - COMPLETION_LIMIT
        # prompt_toolkit writes what the terminal's encoding cannot hold as "?" (PYTHONIOENCODING=ascii)
        dots = "\u2026" if can_encode(getattr(sys.stdout, "encoding", None), "\u2026") else "..."
        yield Completion(raw, start_position=-len(raw), display=f"{dots} {more:,} more: type more of the name")


def current_word_start(text: str) -> int:
    """Where the word being typed starts: after unquoted whitespace, or at a quote still open."""
    start = 0
    quote = ""
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"':
                i += 1
        elif c == "\\":
            i += 1
        elif c in ("'", '"'):
            quote = c
        elif c.isspace():
            start = i + 1
        i += 1
    return min(start, len(text))


def _bool_setting(key: str) -> bool:
    try:
        return isinstance(Settings().get(key), bool)
    except InternVLChatError:
        return False


class ChatCompleter(Completer):
    """Slash commands, their arguments, and media paths typed in messages."""

    def __init__(self, cwd: Path | None = None):
        self.cwd = cwd

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        start = current_word_start(text)
        current = text[start:]
        done = split_words(text[:start])
        body = text.lstrip()
        if body.startswith("/") and not body.startswith("//") and "\n" not in text:
            head = (done[0].raw if done else current)[1:]
            if not done and "/" not in head:
                yield from self._command_names(head)
                return
            spec = COMMAND_BY_NAME.get(head.lower())
            if spec is not None and done:
                yield from self._arguments(spec, [w.raw for w in done[1:]], current)
                return
        if (current.startswith(_PATH_STARTS) or current[:1] in ("'", '"') and current[1:].startswith(_PATH_STARTS)
                or current[:6].lower() in ("file:/", "file:.")):  # a URI offered for a folder not UTF-8, completed further
            yield from complete_path(current, "media", self.cwd)

    def _command_names(self, typed: str) -> Iterator[Completion]:
        for name, spec in COMMAND_BY_NAME.items():
            if name.startswith(typed.lower()):
                yield Completion(f"/{name} ", start_position=-len(typed) - 1, display=f"/{name}", display_meta=spec.help)

    def _arguments(self, spec: CommandSpec, before: list[str], current: str) -> Iterator[Completion]:
        if current.startswith("--") or (current == "-" and spec.options):
            if spec.rest_is_text and before:
                return  # a word of the TEXT (/system's flag stands alone)
            for opt in spec.options:
                if opt.name.startswith(current):
                    yield Completion(opt.name, start_position=-len(current), display_meta=opt.help)
            return
        if before and any(before[-1] == opt.name and opt.kind != "flag" for opt in spec.options):
            return  # the value of an option: a number or a range
        positional = []
        skip = False
        for word in before:
            if skip:
                skip = False
            elif word.startswith("--"):
                skip = "=" not in word
            else:
                positional.append(word)
        if not spec.args or (len(positional) >= len(spec.args) and not spec.args[-1].repeat):
            return
        arg = spec.args[min(len(positional), len(spec.args) - 1)]
        if arg.kind == "session":
            yield from complete_session(current, self.cwd)
        elif arg.kind in _EXTENSIONS:
            yield from complete_path(current, arg.kind, self.cwd)
        elif arg.kind == "setting":
            for key in [*SET_ALIASES, *runtime_keys()]:  # only what /set can change now
                if key.startswith(current.lower()):
                    yield Completion(key, start_position=-len(current))
        elif arg.kind == "value" and positional and _bool_setting(positional[0]):
            for value in ("true", "false"):
                if value.startswith(current.lower()):
                    yield Completion(value, start_position=-len(current))
        elif arg.kind == "command":
            for spec_ in COMMANDS:
                if spec_.name.startswith(current.lstrip("/")):
                    yield Completion(spec_.name, start_position=-len(current))


class LateInterrupt:
    """A Ctrl-C pressed just after Enter, while prompt_toolkit was still winding down.

    Its SIGINT reaches prompt_toolkit's event loop, which runs the `<sigint>` key once the prompt
    has already returned: the stock handler then fails ("Application is not running", a traceback
    on the screen) and the Ctrl-C is lost, so the line went on as if it had not been pressed.
    """

    pressed: bool = False


def key_bindings(late: LateInterrupt | None = None) -> KeyBindings:
    kb = KeyBindings()
    late = late if late is not None else LateInterrupt()

    @kb.add(Keys.SIGINT)
    def _sigint(event) -> None:
        if event.app.is_running:
            event.app.exit(exception=KeyboardInterrupt(), style="class:aborting")
        else:
            late.pressed = True  # the line was accepted: cancel it instead (see run_repl)

    @kb.add("enter")
    def _enter(event) -> None:
        buffer = event.current_buffer
        state = buffer.complete_state
        if state is not None and state.current_completion is not None:
            buffer.complete_state = None  # Enter picks the highlighted completion
        elif block_is_open(buffer.text):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @kb.add("c-d", filter=Condition(_on_last_line_of_open_block))
    def _end_block(event) -> None:
        """Ctrl-D, end of input, ends the block as a line holding \"\"\" does (it did nothing there:
        the line is empty but the buffer is not, and only an empty buffer quits)."""
        event.current_buffer.insert_text(BLOCK_QUOTES)
        event.current_buffer.validate_and_handle()

    @kb.add("escape", "enter")
    @kb.add("c-j")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    @kb.add("c-x", "c-e")
    def _editor(event) -> None:  # prompt_toolkit's own raised UnicodeError on bytes that are not UTF-8
        event.app.create_background_task(edit_in_editor(event.current_buffer))

    stock_mouse = load_mouse_bindings().get_bindings_for_keys((Keys.Vt100MouseEvent,))[0].handler

    @kb.add(Keys.Vt100MouseEvent)
    def _mouse(event):
        """Keys that only look like a mouse report (a colour code, ESC [31m, typed or pasted where
        the terminal does not bracket pastes) made prompt_toolkit's handler raise: a traceback and
        "Press ENTER to continue..." that ate the next keys. They are dropped; a real click works as before."""
        try:
            return stock_mouse(event)
        except (ValueError, KeyError, IndexError):
            return None

    return kb


def _on_last_line_of_open_block() -> bool:
    """The cursor is at the end of a `\"\"\"` block still open, on a line with nothing typed."""
    document = get_app().current_buffer.document
    return document.is_cursor_at_the_end and not document.current_line.strip() and block_is_open(document.text)


def complete_session(raw: str, cwd: Path | None = None, folder: Path | None = None) -> Iterator[Completion]:
    """`/load` completions: names of saved sessions (newest first), then paths."""
    if "/" not in raw and not raw.startswith(("~", "'", '"')):
        try:
            folder = folder or default_sessions_dir()
        except NoHomeFolder:  # no home folder, so no saved sessions: paths still complete (a raise broke the prompt)
            folder = None
        for path, mtime in recent_sessions(folder) if folder is not None else ():
            stem = name_as_text(path.stem)  # as in complete_path
            if stem is not None and stem.startswith(raw) and not has_format_char(stem):
                yield Completion(_escape(stem), start_position=-len(raw), display=visible(stem),
                                 display_meta=file_date(mtime))  # fmt: skip
    yield from complete_path(raw, "file", cwd)


# the history file holds anything typed; this many bytes of its end are read at start
HISTORY_READ_LIMIT = 4 << 20


class PrivateFileHistory(History):
    """The input history in prompt_toolkit's file format, through one descriptor opened safely.

    The file is opened once, without following a symlink (O_NOFOLLOW), and must be a regular
    file; entries are appended through that same descriptor, so the name is never re-opened and
    cannot be swapped for a link to another file afterwards. Write errors lose history, never the
    session.
    """

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd

    def load_history_strings(self) -> Iterable[str]:
        try:
            size = os.fstat(self.fd).st_size
            start = max(0, size - HISTORY_READ_LIMIT)
            data = os.pread(self.fd, size - start, start)
        except OSError:
            return []
        if start > 0:  # the read began inside an entry: its tail, recalled with Up, was sent cut short
            cut = data.find(b"\n#")
            data = data[cut + 1 :] if cut >= 0 else b""
        entries: list[str] = []
        lines: list[str] = []
        for raw in data.decode("utf-8", errors="replace").split("\n"):
            if raw.startswith("+"):
                lines.append(raw[1:])
            elif lines:
                entries.append("\n".join(lines))
                lines = []
        if lines:
            entries.append("\n".join(lines))
        return reversed(entries)  # newest first

    def store_string(self, string: str) -> None:
        entry = f"\n# {datetime.now()}\n" + "".join(f"+{line}\n" for line in string.split("\n"))
        try:
            os.write(self.fd, entry.encode("utf-8", errors="surrogateescape"))
        except OSError:
            pass


def open_history(settings: Settings, app: App | None = None) -> History:
    """The input history file (private, mode 0600), or memory only when disabled or unsafe.

    A symlink, a FIFO, a device or a folder at the history path is refused with one warning: the
    history then stays in memory and the REPL goes on. Only a file we own gets its mode fixed.
    """
    if not settings.ui.history:
        return InMemoryHistory()
    try:
        path = settings.ui.history_path
    except UsageError as e:  # `~` with no home folder, `~user` with no such user: the REPL still starts
        if app is not None:
            app.warn(f"{e}; the history is kept in memory only this time")
        return InMemoryHistory()
    shown = visible(str(path))

    def memory_only(why: str) -> History:
        if app is not None:
            app.warn(f"the history file {shown} {why}; the history is kept in memory only this time")
        return InMemoryHistory()

    try:
        make_private_folders(path.parent)  # each new one, not only the last (Path.mkdir's mode)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if os.path.islink(path):
            return memory_only("is a symbolic link (it is never followed); make it a plain file")
        return memory_only(f"cannot be opened ({e.strerror or e})")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return memory_only("is not a regular file; give ui.history_file a file path")
        os.set_blocking(fd, True)
        if info.st_uid == os.geteuid() and info.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # it may hold anything typed, private or not
    except OSError as e:
        os.close(fd)
        return memory_only(f"cannot be used ({e.strerror or e})")
    return PrivateFileHistory(fd)


def terminal_output() -> Output | None:
    """Where the prompt is drawn: stderr when only stderr is a terminal (`-I | tee log`; drawn into
    the pipe, the prompt and the keys typed were never seen, and its redraws were written into the
    log), else None: prompt_toolkit's own choice (stdout)."""
    if sys.stdout.isatty():
        return None
    return create_output(always_prefer_tty=True)


def ask_yes_no(question: str) -> bool:
    """A yes/no question on the terminal; Enter, Ctrl-C and Ctrl-D mean no."""
    on_stderr = not sys.stdout.isatty() and sys.stderr.isatty()  # stdout piped: input() would ask there, unseen
    try:
        with keys_released():  # asked while a command runs, when typed keys are otherwise held
            if on_stderr:
                sys.stderr.write(question)
                sys.stderr.flush()
                answer = input()
            else:
                answer = input(question)
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr if on_stderr else sys.stdout)  # ends the question's line, where it was asked
        return False
    return answer.strip().lower() in ("y", "yes")


def show_format_chars() -> None:
    """prompt_toolkit draws C0 and C1 controls in the input line as ^X and <8x>, but bidi,
    zero-width and line-separator marks raw: a pasted name holding U+202E showed reordered. They
    are drawn as <202e> too (the line keeps them, so the path still names the file)."""
    for char in FORMAT_CHARS:
        Char.display_mappings.setdefault(char, f"<{ord(char):04x}>")


show_format_chars()  # before anything is drawn: prompt_toolkit caches each character as first drawn


def build_prompt_session(app: App, settings: Settings, late: LateInterrupt | None = None) -> PromptSession:
    # The output is the app session's default, not PromptSession's `output=`: prompt_toolkit gives
    # TERM=dumb its plain prompt only when no output is given, and on stderr that was drawn with
    # cursor moves and bracketed paste instead (the session is made within, so it keeps stderr).
    output = terminal_output()
    with create_app_session(output=output) if output is not None else nullcontext():
        return _prompt_session(app, settings, late)


class _PromptSession(PromptSession):
    """PromptSession whose plain prompt (TERM=dumb) shows the text the line starts with: it echoes
    only the keys typed after it, so a failed message given back, or keys typed ahead, were sent
    unseen with Enter. It also runs the prompt's `pre_run`: prompt_toolkit leaves it with `app`,
    which the plain prompt does not run (it runs an Application of its own), so ReplSignals never
    learnt of it, and SIGTERM or SIGHUP acted only once a line was entered."""

    @contextmanager
    def _dumb_prompt(self, message=""):
        with super()._dumb_prompt(message) as application:
            application.pre_run_callables.extend(self.app.pre_run_callables)
            del self.app.pre_run_callables[:]
            if self.default_buffer.text:
                self.output.write(visible_lines(self.default_buffer.text))
                self.output.flush()
            yield application


def _prompt_session(app: App, settings: Settings, late: LateInterrupt | None) -> PromptSession:
    return _PromptSession(
        history=open_history(settings, app),
        completer=ChatCompleter(app.cwd),
        complete_while_typing=False,
        key_bindings=key_bindings(late),
        multiline=True,
        prompt_continuation=lambda width, line_number, wrap_count: "." * max(width - 1, 0) + " ",
        enable_open_in_editor=False,  # Ctrl-X Ctrl-E is bound in key_bindings (editor.py)
        enable_suspend=True,  # Ctrl-Z stops the program, as in a shell (it typed a literal ^Z into the message)
        color_depth=None,
    )


# what ends the REPL, the terminal put back first (SIGQUIT: `kill -QUIT`, or Ctrl-\ while the app
# works; the prompt reads keys raw, where Ctrl-\ sends no signal and does nothing)
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class ReplSignals:
    """How Ctrl-C (SIGINT), SIGTERM and SIGHUP reach the REPL.

    SIGTERM, SIGHUP and SIGQUIT end it as SystemExit(128 + signal), so every `with` that changed
    the terminal (prompt_toolkit's raw mode, `held_keys`) puts it back; by default they end the process at once, the terminal left raw (no echo, and
    SIGQUIT's core dump with the cursor hidden mid-answer).

    Ctrl-C raises KeyboardInterrupt only inside `raising()` (loading, a command, an answer: it
    stops that work). Elsewhere, between the work and the prompt, it is kept and clears the next
    prompt's line: raised there, it ended the REPL ("interrupted", status 130) or, inside the
    event loop asyncio.run was building, printed "Exception ignored in BaseEventLoop.__del__".

    While a prompt runs nothing is raised where a signal lands: inside prompt_toolkit's event
    loop SystemExit became "Unhandled exception in event loop", a traceback, "Press ENTER to
    continue..." and a terminal left without echo. The prompt is asked to exit with it instead
    (prompt_toolkit handles Ctrl-C itself while it runs); a signal that comes as the prompt
    starts is acted on when it starts, one that comes as it ends after it returns.
    """

    def __init__(self) -> None:
        self.exit_code: int | None = None
        self.interrupted = False  # a Ctrl-C not acted on yet
        self._raising = False
        self._prompt_app = None  # the prompt's Application while `prompt` runs

    def install(self) -> None:
        for signum in EXIT_SIGNALS:
            signal.signal(signum, self._on_exit_signal)
        signal.signal(signal.SIGINT, self._on_interrupt)

    @contextmanager
    def raising(self) -> Iterator[None]:
        """Ctrl-C raises KeyboardInterrupt inside the block (also one pressed just before it)."""
        self._raising = True
        try:
            if self.interrupted:
                raise KeyboardInterrupt
            yield
        finally:
            self._raising = False
            self.interrupted = False

    def _on_interrupt(self, signum: int, frame) -> None:
        self.interrupted = True
        if self._raising:
            raise KeyboardInterrupt
        self._wake_prompt()

    def _on_exit_signal(self, signum: int, frame) -> None:
        for exit_signal in EXIT_SIGNALS:  # a second one must not cut the clean-up short
            signal.signal(exit_signal, signal.SIG_IGN)
        self.exit_code = 128 + signum
        if self._prompt_app is None:
            raise SystemExit(self.exit_code)
        self._wake_prompt()

    def _wake_prompt(self) -> None:
        app = self._prompt_app
        loop = app.loop if app is not None else None
        if app is not None and app.is_running and loop is not None:
            try:
                loop.call_soon_threadsafe(self._end_prompt)
            except RuntimeError:
                pass  # the loop just closed: `prompt` acts on it on its way out

    def _prompt_started(self) -> None:
        """Run as the prompt starts, by the Application that runs it: the plain prompt's (TERM=dumb)
        is one of its own, not the session's `app`."""
        self._prompt_app = get_app()
        self._end_prompt()

    def _end_prompt(self) -> None:
        app = self._prompt_app
        if app is None or not app.is_running or app.future is None or app.future.done():
            return
        if self.exit_code is not None:
            app.exit(exception=SystemExit(self.exit_code))
        elif self.interrupted:
            self.interrupted = False
            app.exit(exception=KeyboardInterrupt(), style="class:aborting")

    def prompt(self, session: PromptSession, *args, **kwargs) -> str:
        """`session.prompt(...)`; KeyboardInterrupt for a Ctrl-C kept from before it, SystemExit
        for SIGTERM/SIGHUP. A Ctrl-C that comes as it returns a line is left in `interrupted`."""
        self._prompt_app = session.app
        try:
            return session.prompt(*args, pre_run=self._prompt_started, **kwargs)
        finally:
            self._prompt_app = None
            if self.exit_code is not None:
                raise SystemExit(self.exit_code)


def run_repl(args: argparse.Namespace, settings: Settings, prompt: str | None = None) -> int:
    if not sys.stdin.isatty():
        raise UsageError("the REPL needs a terminal on stdin; use --script FILE for scripted input "
                         "(--script - reads it from stdin) or -p TEXT")  # fmt: skip
    if not (sys.stdout.isatty() or sys.stderr.isatty()):  # its prompt would go, unseen, into a file
        raise UsageError("the REPL needs a terminal on stdout or stderr to show its prompt; "
                         "leave one of them on the terminal, or use -p TEXT or --script FILE")
    signals = ReplSignals()
    signals.install()
    console = ui_console(sys.stdout, settings.ui)
    # keys typed while the model loads or an answer streams are not echoed into the output: they
    # wait for the next prompt, which starts with them
    with held_keys() as typed:
        with signals.raising():  # Ctrl-C while loading quits (130)
            session = open_conversation(settings, show_progress=console.is_terminal)
            app = App(session, settings, console, interactive=True)
            app.confirm = ask_yes_no
            app.remake_console = lambda: ui_console(sys.stdout, settings.ui)
            app.banner()
            try:
                app.attach(media_from_flags(session, args, settings))
            except InternVLChatError as e:
                app.error(str(e))
        if prompt:
            _interruptible(app, signals, lambda: app.handle_message(prompt))
    _offer_back_failed(app, typed)  # -I's prompt: as for a typed message
    late = LateInterrupt()
    prompt_session = build_prompt_session(app, settings, late)
    while True:
        late.pressed = False
        try:
            # read with the locale's encoding: under an ASCII one each byte of a typed "é" was a surrogate, refused as not UTF-8
            line = typed_as_utf8(signals.prompt(prompt_session, app.prompt_text(), default=typed.text))
        except KeyboardInterrupt:
            typed.text = ""
            continue  # Ctrl-C at the prompt: a fresh, empty line
        except EOFError:
            break
        if late.pressed or signals.interrupted:  # Ctrl-C right after Enter: as if it had come a moment later
            late.pressed = signals.interrupted = False
            typed.text = ""
            app.say("[cancelled before it began; the conversation is unchanged]", "yellow")
            continue
        with held_keys() as typed:
            result = _interruptible(app, signals, lambda: app.handle_line(line))
        if result == EXIT:
            break
        _offer_back_failed(app, typed)
    if app.pending:  # they would vanish without a word; said, not asked: quitting stays one key
        app.warn(unsent_note(app.pending, "you quit"))
    return 0


# a command (/drop, /set) typed at that prompt would be added to the message and sent with it
FAILED_MESSAGE_KEPT = ("[the message is back at the prompt: Enter sends it again; to run a command first, "
                       "Ctrl-C clears the line and the Up arrow finds the message again]")


def next_prompt_text(failed: str | None, typed: str) -> str:
    """What the next prompt starts with: a message that failed before it was sent (a picture that
    does not decode: fixed with /drop, it is sent again with Enter), then on a line of its own what
    was typed while it ran; neither is lost. A triple-quote block keeps its closing quotes last: the
    keys go inside it (after it, the block was open again, and Enter added a line)."""
    if not failed:
        return typed
    if not typed:
        return failed
    body = failed.rstrip()
    if not body.lstrip().startswith(BLOCK_QUOTES) or block_is_open(body):
        return f"{failed}\n{typed}"
    inside, closing = body[: -len(BLOCK_QUOTES)], failed[len(body) - len(BLOCK_QUOTES) :]
    head, _, indent = inside.rpartition("\n")
    if head and not indent.strip():  # the quotes on a line of their own (indented as typed)
        return f"{head}\n{typed}\n{indent}{closing}"
    return f"{inside}\n{typed}{closing}"  # the quotes ended the last line of text


def _offer_back_failed(app: App, typed: TypeAhead) -> None:
    """The next prompt starts with the message that just failed before it was sent, said once."""
    typed.text = next_prompt_text(app.failed_message, typed.text)
    if app.failed_message:
        app.note(FAILED_MESSAGE_KEPT)


def _interruptible(app: App, signals: ReplSignals, action) -> str | None:
    """A Ctrl-C that slips past the app's own handling (between two steps) ends only that input."""
    try:
        with signals.raising():
            return action()
    except KeyboardInterrupt:
        app.say("[interrupted]", "yellow")
        return None
    finally:
        # a Ctrl-C (here or caught by the app: a turn's) whose handler raised just as a native
        # stderr window was to close left fd 2 on the private file for the rest of the run
        close_leftover_windows()
