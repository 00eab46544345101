"""The interactive REPL: a prompt_toolkit front end for `App`.

Keys: Enter sends; Alt+Enter, Esc Enter and Ctrl-J add a line; a buffer that starts with `\"\"\"`
takes lines until the closing `\"\"\"`; Ctrl-X Ctrl-E edits the buffer in $EDITOR; Tab completes
slash commands, their arguments (setting keys, media paths filtered by extension, any path for
/save /load /export) and media paths typed in a message; Ctrl-C clears the line (and cancels
work while the model runs, see app.py); Ctrl-D on an empty line quits. Bracketed paste is
prompt_toolkit's default: a pasted text with newlines stays one message.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings

from ..errors import InternVLChatError, UsageError
from ..settings import SET_ALIASES, Settings
from .app import EXIT, App, block_is_open, runtime_keys
from .commands import COMMAND_BY_NAME, COMMANDS, CommandSpec, split_words
from .paths import IMAGE_EXTENSIONS, MEDIA_EXTENSIONS, VIDEO_EXTENSIONS, shell_unquote
from .render import make_console
from .setup import media_from_flags, open_session
from .typeahead import held_keys

_EXTENSIONS = {"image": IMAGE_EXTENSIONS, "video": VIDEO_EXTENSIONS, "media": MEDIA_EXTENSIONS, "file": None}
_PATH_STARTS = ("/", "~", "./", "../")
_ESCAPE = set(" \t'\"\\")


def _escape(path: str) -> str:
    return "".join("\\" + c if c in _ESCAPE else c for c in path)


def complete_path(raw: str, kind: str, cwd: Path | None = None) -> Iterator[Completion]:
    """Completions of the partly typed path `raw` (as typed: quoted, escaped or plain).

    `kind`: "image", "video", "media" (either) or "file" (anything). Folders are always offered.
    The replacement keeps the user's quoting style and `~`.
    """
    quote = raw[0] if raw[:1] in ("'", '"') else ""
    typed = raw[1:] if quote else raw
    if not quote:
        try:
            typed = shell_unquote(typed)
        except ValueError:
            pass
    head, prefix = os.path.split(typed)
    folder = Path(os.path.expanduser(head or "."))
    if cwd is not None and not folder.is_absolute():
        folder = cwd / folder
    wanted = _EXTENSIONS[kind]
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not name.startswith(prefix) or (name.startswith(".") and not prefix.startswith(".")):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            continue
        if not is_dir and wanted is not None and Path(name).suffix.lower() not in wanted:
            continue
        full = os.path.join(head, name) + ("/" if is_dir else "")
        if quote:
            text = quote + full + ("" if is_dir else quote)
        else:
            text = _escape(full)
        yield Completion(text, start_position=-len(raw), display=name + ("/" if is_dir else ""))


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
        if current.startswith(_PATH_STARTS) or current[:1] in ("'", '"') and current[1:].startswith(_PATH_STARTS):
            yield from complete_path(current, "media", self.cwd)

    def _command_names(self, typed: str) -> Iterator[Completion]:
        for name, spec in COMMAND_BY_NAME.items():
            if name.startswith(typed.lower()):
                yield Completion(f"/{name} ", start_position=-len(typed) - 1, display=f"/{name}", display_meta=spec.help)

    def _arguments(self, spec: CommandSpec, before: list[str], current: str) -> Iterator[Completion]:
        if current.startswith("--") or (current == "-" and spec.options):
            for opt in spec.options:
                if opt.name.startswith(current):
                    yield Completion(opt.name, start_position=-len(current), display_meta=opt.help)
            return
        if before and any(before[-1] == opt.name for opt in spec.options):
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
        if arg.kind in _EXTENSIONS:
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


def key_bindings() -> KeyBindings:
    kb = KeyBindings()

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

    @kb.add("escape", "enter")
    @kb.add("c-j")
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    return kb


def open_history(settings: Settings, app: App | None = None) -> History:
    """The input history file (created private, mode 0600), or memory only when disabled."""
    if not settings.ui.history:
        return InMemoryHistory()
    path = settings.ui.history_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)  # it may hold anything typed, private or not
    except OSError as e:
        if app is not None:
            app.warn(f"cannot use the history file {path} ({e.strerror}); the history is kept in memory only")
        return InMemoryHistory()
    return FileHistory(str(path))


def build_prompt_session(app: App, settings: Settings) -> PromptSession:
    return PromptSession(
        history=open_history(settings, app),
        completer=ChatCompleter(app.cwd),
        complete_while_typing=False,
        key_bindings=key_bindings(),
        multiline=True,
        prompt_continuation=lambda width, line_number, wrap_count: "." * max(width - 1, 0) + " ",
        enable_open_in_editor=True,
        color_depth=None,
    )


def run_repl(args: argparse.Namespace, settings: Settings, prompt: str | None = None) -> int:
    if not sys.stdin.isatty():
        raise UsageError("the REPL needs a terminal on stdin; use --script FILE for scripted input or -p TEXT")
    console = make_console(sys.stdout, color="never" if settings.ui.plain else settings.ui.color)
    # keys typed while the model loads or an answer streams are not echoed into the output: they
    # wait for the next prompt, which starts with them
    with held_keys() as typed:
        session = open_session(settings, show_progress=console.is_terminal)
        app = App(session, settings, console, interactive=True)
        app.banner()
        try:
            app.attach(media_from_flags(session, args, settings))
        except InternVLChatError as e:
            app.error(str(e))
        if prompt:
            _interruptible(app, lambda: app.handle_message(prompt))
    prompt_session = build_prompt_session(app, settings)
    while True:
        try:
            line = prompt_session.prompt(app.prompt_text(), default=typed.text)
        except KeyboardInterrupt:
            typed.text = ""
            continue  # Ctrl-C at the prompt: a fresh, empty line
        except EOFError:
            break
        with held_keys() as typed:
            result = _interruptible(app, lambda: app.handle_line(line))
        if result == EXIT:
            break
    return 0


def _interruptible(app: App, action) -> str | None:
    """A Ctrl-C that slips past the app's own handling (between two steps) ends only that input."""
    try:
        return action()
    except KeyboardInterrupt:
        app.say("[interrupted]", "yellow")
        return None
