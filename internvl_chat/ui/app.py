"""The chat app shared by the REPL and `--script`: one conversation, the Settings, pending attachments.

The conversation is any `chat.conversation.Conversation`: the local Session or a remote server's
(`--server`). The app never asks which: what differs (where answers come from, whether token
counts are exact or estimates, peak memory worth showing) is in the conversation's answers.

`App.handle_line(text)` takes one REPL input (a message, a slash command, or a `\"\"\"` block),
runs it, prints what happened on the console and returns OK, ERROR or EXIT. Errors the user can
act on are printed as one line and never end the app; the conversation survives them.

Attachments (`/image`, `/video`, media paths typed in a message) wait in `pending` and go with
the next message. Their cost is measured and shown before anything is decoded, and an attachment
that would not fit in the context is refused. A picture is then decoded once (and let go), so a
truncated or corrupt one is refused as it is attached, not when the message is sent.

Ctrl-C (with `interactive=True`): before the answer's first text (media decoding, vision,
prefill) it abandons the turn and leaves the conversation as it was; once the answer streams it
sets the cancel flag, so the answer stops between tokens and its partial text is kept, marked.
"""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from ..chat.advice import any_of
from ..chat.conversation import Conversation
from ..chat.sampling import params_from_settings
from ..chat.session import Media
from ..errors import ContextOverflowError, InternVLChatError, MediaError, UsageError
from ..files import (check_working_folder, real_path, too_long_path_line, undecodable_byte, visible, visible_lines,
                     working_folder)
from ..media.image import check_image_decodes
from ..numbers import counted
from ..settings import Settings, format_settings
from .answer_text import AnswerCleaner
from .commands import (Command, Message, attach_command_lines, escaped_breaks_kept, format_help, parse_line, typed_message,
                       unwrap_block)  # fmt: skip
from .media_paths import (check_typed_paths, expand_wildcards, not_attached_lines, not_sent, only_missing_paths,
                          take_media_paths)
from .paths import media_kind
from .peak_memory import peak_memory, reset_peak_memory
from .render import choose_stream, colour_off
from .set_keys import changeable_while_running, read_at_start, set_key
from .session_commands import SessionFileCommands
from .settings_text import (LISTED_VALUE_WIDTH, NOT_THIS_CHATS, chat_sections, left_out_note, setting_source,
                            setting_text, settings_table, unset_system)
from .spinner import spin
from .stats_table import stats_rows
from .summary_lines import format_attach_line, format_stats, percent
from .text_wrap import format_columns, one_line_excerpt, wrap_text

OK, ERROR, EXIT = "ok", "error", "exit"
# What the embedded demo model can answer (README, "What it can do").
DEMO_MODEL_NOTE = (
    "it only answers short questions about simple drawn shapes: how many, what colour, which shape, "
    "left or right, top or bottom, or a one-sentence description; --model DIR loads a real InternVL3"
)
WARN_FRACTION = 0.8  # warn when an attachment fills this much of the context
NAMES_SHOWN = 3  # files named in a refusal to attach several at once
# values that unset other settings (`/set seed none`); for system.message they are its text
UNSET_WORDS = ("none", "null", "default", "unset")
KEYS_HELP = (
    "keys: Enter sends · Alt+Enter, Esc Enter or Ctrl-J adds a line · \"\"\" starts and ends a block · "
    "Ctrl-X Ctrl-E opens $VISUAL or $EDITOR · Ctrl-C cancels an answer or clears the line · Ctrl-D quits"
)


def media_names(media: Sequence[Media]) -> str:
    """`a.png, b.png, c.png and 9 more`: the files named, shown inert (`/image *.png` in a big folder
    gives the reason, not a page of names)."""
    names = ", ".join(visible(m.path.name) for m in media[:NAMES_SHOWN])
    return names + (f" and {len(media) - NAMES_SHOWN:,} more" if len(media) > NAMES_SHOWN else "")


def unsent_note(pending: Sequence[Media], ended: str, fix: str = "") -> str:
    """The warning for attachments left when the input ended (`ended`: `the script ended`): they go
    with a message, and none came; `fix` says what to do about it, where something can be done."""
    n = len(pending)
    what = f"{n} attachment was" if n == 1 else f"{n} attachments were"
    note = f"{what} never sent ({media_names(pending)}): attachments go with the next message, and {ended} before one"
    return f"{note}; {fix}" if fix else note


@contextmanager
def _none_attached_said(count: int, kind: str) -> Iterator[None]:
    """One file of several (`/image shots/*.png`) refused refuses them all; the error says so: it
    named only the damaged file, and the others seemed attached. (A context overflow names them all.)"""
    try:
        yield
    except ContextOverflowError:
        raise
    except InternVLChatError as e:
        if count > 1:
            e.args = (f"none of the {count:,} {kind}s was attached: {e}",)
        raise


def _check_utf8(text: str) -> None:
    """Refuse input holding bytes that are not UTF-8 (the terminal decodes them as surrogates)."""
    bad = undecodable_byte(text)
    if bad is not None:
        raise UsageError(f"the input is not UTF-8 text (byte 0x{bad:02x}); check the terminal's encoding")


_FREE_SPACE = "free some disk space, or give a path on another disk"
# errors only writing gives (a full disk or quota, a read-only file system, `ulimit -f`), each with its fix
_WRITE_FIXES = {errno.ENOSPC: _FREE_SPACE, errno.EDQUOT: _FREE_SPACE, errno.EROFS: "give a path on another disk",
                errno.EFBIG: "raise the file-size limit (ulimit -f)"}  # fmt: skip


def _os_error_line(e: OSError) -> str:
    """The line for a file the app could not use (writing /save, /export files: write_atomic
    names the user's path). A path too long for the file system is cut short: a pasted
    5,000-character one came back whole, with advice about permissions that did not apply."""
    if e.errno == errno.ENAMETOOLONG and e.filename:
        return too_long_path_line(str(e.filename))
    where = f" {e.filename}" if e.filename else ""
    if e.errno in _WRITE_FIXES:  # no path or permission is at fault: the disk, or a limit on what may be written
        return f"cannot write{where}: {e.strerror or e}; {_WRITE_FIXES[e.errno]}"
    return f"cannot use{where}: {e.strerror or e}; check the path and its permissions"


def _dropped_note(dropped: int) -> str:
    """`; 1 file the lines before it attached was dropped`: what a paste given back took off (none: "")."""
    if not dropped:
        return ""
    return f"; {counted(dropped, 'file')} the lines before it attached {'was' if dropped == 1 else 'were'} dropped"


class App(SessionFileCommands):
    """The REPL's brain; the REPL and `--script` only read lines and hand them here."""

    # Folders searched before the working folder for relative media and session paths (the
    # script's folder in --script mode).
    search_dirs: tuple[Path, ...] = ()
    # Asks a yes/no question (the REPL sets it); None: never ask, refuse instead (scripts).
    confirm: Callable[[str], bool] | None = None
    # Makes the console again for the ui settings now, after `/set plain` (the REPL and --script
    # set it: render.ui_console). A console made with ui.plain into a pipe is no terminal for good:
    # `/set plain off` after --plain with ui.color = always got neither colours nor Markdown back.
    # None: only the console's colours follow ui.plain.
    remake_console: Callable[[], Console] | None = None

    def __init__(
        self,
        session: Conversation,
        settings: Settings,
        console: Console | None = None,
        *,
        interactive: bool = False,
        cwd: str | Path | None = None,
    ):
        self.session = session
        self.settings = settings
        self.console = console or Console()
        # colours without ui.plain (the console was made with the value at start): `/set plain off` brings them back
        self._colour_off = colour_off(settings.ui.color) if settings.ui.plain else bool(self.console.no_color)
        self.interactive = interactive  # Ctrl-C cancels work instead of ending the program
        self.cwd = Path(cwd) if cwd is not None else None
        self.pending: list[Media] = []
        self.last_peak: int | None = None  # bytes, of the last answer
        # (question, answer) of each turn when the conversation was last saved or loaded: /load
        # asks before it replaces a conversation that differs from it
        self._saved_turns: list[tuple[str, str]] = []
        # the last input's message as typed, when it failed before a turn was kept (a picture that
        # does not decode, a message too long): the REPL's next prompt starts with it, nothing is lost
        self.failed_message: str | None = None
        self._greedy_retry_said = False  # /retry's greedy note, said once: greedy is the default

    # ---- output ---------------------------------------------------------------------------

    @property
    def width(self) -> int | None:
        """The terminal's width now (it may change between two lines), None when not a terminal."""
        return self.console.width if self.console.is_terminal else None

    def say(self, text: str, style: str | None = None) -> None:
        """One line (or a few), printed as is (no markup, no highlighting), broken at word
        boundaries to fit the terminal (a pipe or file gets the lines whole)."""
        text = wrap_text(text, self.width)
        self.console.print(Text(text, style=style or ""), soft_wrap=True, markup=False, highlight=False)

    def note(self, text: str) -> None:
        self.say(text, "dim")

    def warn(self, text: str) -> None:
        self.say(f"warning: {visible(text)}", "yellow")  # messages may quote paths and file contents

    def error(self, text: str) -> None:
        self.say(f"error: {visible(text)}", "bold red")

    @property
    def plain(self) -> bool:
        return self.settings.ui.plain or not self.settings.ui.markdown

    @property
    def fancy(self) -> bool:
        """Spinners and live regions: only on a real terminal (not a file given colours), and not with --plain."""
        return self.console.is_interactive and not self.settings.ui.plain

    @contextmanager
    def spinner(self, text: str) -> Iterator[None]:
        if not self.fancy:
            yield
            return
        with spin(self.console, text):
            yield

    def prompt_text(self) -> str:
        return f"[+{len(self.pending)}] > " if self.pending else "> "

    @property
    def approx(self) -> str:
        """The mark before token numbers that are estimates (a remote server counts the real ones)."""
        return "" if self.session.token_counts_exact else "≈"

    def context_share(self, tokens: int) -> float | None:
        """`tokens` as a fraction of the context; None when the limit is not known."""
        limit = self.session.max_context
        return tokens / limit if limit else None

    def banner(self) -> None:
        info = self.session.describe()
        name = "the embedded demo model" if info.demo else visible(info.name)
        context = f"context {info.context:,} tokens" if info.context else "context: the server's limit"
        self.say(f"internvl-chat · {name} · {visible(info.where)} · {context}", "bold")
        if info.demo:
            self.note(DEMO_MODEL_NOTE)
        self.note("type a message, /help for the commands; Ctrl-D, /exit or /bye quits")

    # ---- dispatch -------------------------------------------------------------------------

    def handle_line(self, line: str) -> str:
        """Run one input; OK, ERROR (printed as one line, the app goes on) or EXIT."""

        def run() -> str:
            _check_utf8(line)
            block = unwrap_block(line)
            if block is not None:
                return self._send_text(block, typed=line)  # text as written: its lines run no command
            if not line.strip():
                return OK
            return self._run_input(line.strip("\n"))

        self.failed_message = None
        return self._guard(run)

    def _run_input(self, text: str) -> str:
        """An input of one or more lines. Pasted lines that start with one-line commands (`/image
        cat.png` then a question) run one by one, the text after them goes as one message: the whole
        paste was one command with the other lines as its arguments ("How is not a file"). A loop, not
        a call per line: a paste of a thousand commands passed Python's recursion limit."""
        lines = escaped_breaks_kept(text.split("\n"))
        i = 0  # lines[:i] have run
        # where the run of /image and /video lines before the message began, and what was attached
        # before it: a line that fails gives the paste back from there, those attachments dropped
        block, attached = None, list(self.pending)
        while i < len(lines) - 1:
            try:
                command = parse_line(lines[i])
            except UsageError as e:
                left = len(lines) - i
                start, kept = (i, list(self.pending)) if block is None else (block, attached)
                dropped = _dropped_note(self._give_back(lines, start, kept))
                raise UsageError(f"{e} (nothing of the {left} lines was run)" if i == 0 else
                                 f"{e} (it and the {counted(left - 1, 'line')} after it were not run{dropped})") from None  # fmt: skip
            if not (isinstance(command, Command) and self._one_line_command(command)):
                break
            if block is None:  # a failing line gives back from the run of /image and /video lines before it
                block, attached = i, list(self.pending)
            result = self._guard(lambda: self.run_command(command))
            i += 1
            more = any(line.strip() for line in lines[i:])
            if result != OK or not more:
                if result == ERROR and more:
                    after = len(lines) - i
                    dropped_note = _dropped_note(self._give_back(lines, block, attached))
                    self.note(f"(the {counted(after, 'line')} after it {'was' if after == 1 else 'were'} not run{dropped_note})")
                return result
            if command.name not in ("image", "video"):
                block = None
            while not lines[i].strip():  # blank lines between commands (`more`: a line with text follows)
                i += 1
        typed = "\n".join(lines[i:])
        parsed = parse_line(typed)
        if not isinstance(parsed, Message):
            return self.run_command(parsed)
        first = parsed.text[: len(parsed.text) - (len(typed) - len(lines[i]))]  # its line as parsed: `//` made `/`
        kept = list(self.pending)
        try:
            text = self._run_attach_lines([first, *lines[i + 1 :]])
            if text is None:
                self.failed_message = typed
                return ERROR
            return self._send_text(text, typed=typed)  # the commands before it have run: not given back
        finally:
            if self.failed_message is not None:  # not sent, offered back as typed: its attach lines run again
                self.pending = [m for m in self.pending if any(m is k for k in kept)]

    def _give_back(self, lines: list[str], start: int, attached: list) -> int:
        """A paste stopped by a failing line: lines[start:] (the failed line, the run of /image and
        /video lines before it, and the lines not run) are offered back for the next prompt, as a
        message that fails before it is sent is, and what those lines attached is dropped, so that
        Enter (the path fixed) attaches it once again. Returns how many attachments were dropped."""
        self.failed_message = "\n".join(lines[start:])
        kept = [m for m in self.pending if any(m is k for k in attached)]
        dropped, self.pending = len(self.pending) - len(kept), kept
        return dropped

    def _run_attach_lines(self, lines: list[str]) -> str | None:
        """A message's pasted lines (`lines`, escaped line breaks kept) with its `/image` and `/video`
        lines that carry options (`/video clip.mp4 --frames 4`) run as those commands, their options applied,
        and left out: the text to send; None when one failed (said; nothing is sent). Without the
        options the path was attached with the default frames, and the model read "/video --frames 4"."""
        attaching = attach_command_lines(lines)  # the first is text, and so is a fenced or indented code block
        for k in attaching:
            result = self._guard(lambda k=k: self.run_command(parse_line(lines[k])))
            if result != OK:
                self.note("(the message was not sent)")
                return None
        return "\n".join(line for k, line in enumerate(lines) if k not in attaching)

    def _one_line_command(self, command: Command) -> bool:
        """A command that ends with its line: not /system TEXT nor /set system.message VALUE, whose
        text may hold several lines."""
        if command.name == "system":
            return bool(command.options)  # `/system --default` takes no text
        if command.name == "set" and command.args:
            try:
                return set_key(command.args[0], self.settings.remote.server) != "system.message"
            except UsageError:
                return True  # said when it runs
        return True

    def handle_message(self, text: str) -> str:
        """Send `text` as a message even when it starts with a slash (the prompt of `-I`); one that
        fails before it is sent is kept in `failed_message` as typed at a prompt it sends the same text."""
        self.failed_message = None
        return self._guard(lambda: _check_utf8(text) or self._send_text(text, typed=typed_message(text)))

    def _guard(self, action: Callable[[], str]) -> str:
        try:
            return action()
        except InternVLChatError as e:
            self.error(str(e))
            return ERROR
        except OSError as e:
            self.error(_os_error_line(e))
            return ERROR

    def _send_text(self, text: str, typed: str | None = None) -> str:
        """Send `text`; `typed`: the input as typed (`//`, `\"\"\"` kept), kept in `failed_message`
        when the message fails before a turn is kept."""
        if not text.strip():
            return OK
        before = len(self.session.turns)
        try:
            return self.send(text.strip())
        except (InternVLChatError, OSError):
            if typed is not None and len(self.session.turns) == before:
                self.failed_message = typed
            raise

    def run_command(self, command: Command) -> str:
        handler: Callable[[Command], str | None] = getattr(self, f"cmd_{command.name}")
        return handler(command) or OK

    # ---- attachments ------------------------------------------------------------------------

    def describe(self, path: Path, kind: str | None = None, frames: int | None = None,
                 video_range: tuple[float, float] | None = None) -> Media:  # fmt: skip
        """Measure one file (no decoding). `kind` None: by extension, images by default."""
        path = self._resolve(path)
        kind = kind or media_kind(path) or "image"
        if kind == "video":
            media = self.session.describe_video(path, frames or self.settings.media.frames, video_range)
            if video_range and media.duration and video_range[0] >= media.duration:
                raise MediaError(
                    f"the range starts at {video_range[0]:g} s but {visible(path.name)} is only "
                    f"{media.duration:.2f} s long; choose an earlier start"  # as decoding says it: 1.36 s, not 1.4
                )
            return media
        return self.session.describe_image(path, self.settings.media.max_tiles)

    def _resolve(self, path: Path) -> Path:
        """A path to read: relative ones are looked up in `search_dirs`, then the working folder."""
        path = Path(path)  # `~` was expanded by normalize_path, on the typed text
        if path.is_absolute():
            return path
        for folder in self.search_dirs:
            if (folder / path).exists():
                return folder / path
        return self._output_path(path)

    def _output_path(self, path: Path) -> Path:
        """A path to write: relative to the working folder."""
        path = Path(path)  # `~` was expanded by normalize_path, on the typed text
        if self.cwd is not None and not path.is_absolute():
            path = self.cwd / path
        elif path.parts and path.parts[0].startswith("~"):  # typed as `./~draft.png`: never read as ~user further on
            path = working_folder(path, "the file") / path
        else:  # a folder deleted since: os calls said only "No such file or directory"
            check_working_folder(path, "the file")
        return path

    def _places(self, path: Path) -> list[Path]:
        """Where a path is looked for, in order: as given when absolute, else in `search_dirs`, then
        the working folder (`_resolve` takes the first that exists)."""
        return [path] if path.is_absolute() else [*(folder / path for folder in self.search_dirs), self._output_path(path)]

    def attach(self, media: Sequence[Media]) -> None:
        """Add described media to the next message, printing each one's cost; refuse what cannot fit."""
        media = list(media)
        if not media:
            return
        try:
            self.session.check_attach(self.pending + media)
        except ContextOverflowError as e:
            raise ContextOverflowError(f"cannot attach {media_names(media)}: {e}") from None
        self._check_images_decode(media)
        for item in media:
            self.pending.append(item)
            fraction = self.context_share(self.session.context_used + self.session.turn_tokens(self.pending))
            self.say(self.attach_line(item, fraction), "green")
            item.cut_short_said = item.cut_short is not None  # said here, so not again with the answer
        if fraction is not None and fraction >= WARN_FRACTION:
            clear = ", /clear" if self.session.turns else ""  # /clear keeps the attachments: it frees only turns
            self.warn(
                f"the context will be {self.approx}{percent(fraction)} full with this message; "
                f"/drop an attachment{clear}, or lower max_tiles / frames to keep room for later turns"
            )

    def _check_images_decode(self, media: Sequence[Media]) -> None:
        """Decode each picture once, before any is attached: a truncated one passed the header probe
        and failed only when the message was sent, the question typed for it with it."""
        for item in media:
            if item.kind == "image":
                with self.spinner(f"reading {visible(item.path.name)} …"):
                    check_image_decodes(item.path)

    def attach_line(self, media: Media, fraction: float | None) -> str:
        tokens = self.session.media_tokens([media])
        name = visible(media.path.name)  # a file name is anything but \0 and /
        approx = not self.session.token_counts_exact
        if media.kind == "image":
            size = media.size
            if size is not None and media.unused_note:  # the model sees one picture: say which
                size = f"{size[0]}×{size[1]} ({media.unused_note})"
            return format_attach_line("image", name, size, self.session.tiles_sent(media), tokens, fraction, approx)
        what = f"{media.tiles} frame" + ("" if media.tiles == 1 else "s")
        if media.video_range:
            what += f" from {media.video_range[0]:g}–{media.video_range[1]:g} s"
        elif media.duration:
            what += f" of {media.duration:.1f} s"
        if media.cut_short:  # the length above is what it holds: no note with the answer says it again
            held, listed = media.cut_short
            what += f" (cut short: it holds {held:,} of its {listed:,} frames)"
        elif media.ends_early:  # how many frames it holds is found decoding: the note after the answer says
            what += " (cut short: the file ends before its last frame)"
        return format_attach_line("video", name, what, None, tokens, fraction, approx)

    def _auto_attach(self, text: str) -> tuple[list[Media], str]:
        """Media paths typed in a message: the existing image/video files not already attached,
        and the message without the paths (the model gets the files, not their names)."""
        if not self.settings.media.auto_attach:
            return [], text
        text, paths, missing = take_media_paths(text, self.cwd, self.search_dirs)
        if only_missing_paths(text, missing):
            raise UsageError(not_sent(missing))
        for line in not_attached_lines(missing):
            self.warn(line)
        attached = {real_path(m.path) for m in self.pending}
        return [self.describe(p, media_kind(p)) for p in paths if real_path(p) not in attached], text

    # ---- turns ----------------------------------------------------------------------------

    def send(self, text: str) -> str:
        """Ask `text` with the pending attachments (and media paths found in it)."""
        auto, text = self._auto_attach(text)
        if auto:
            self.attach(auto)  # prints the confirmation lines
            auto_ids = {id(m) for m in auto}
        else:
            auto_ids = set()
        media = list(self.pending)
        before = len(self.session.turns)
        try:
            return self._answer(
                lambda cancel: self.session.ask(text, media, self.session.params, cancel),
                self._work_label(media),
            )
        except MediaError as e:
            raise MediaError(f"{e} (/media lists the attachments, /drop N removes one)") from None
        finally:
            if len(self.session.turns) > before:
                self.pending = []
            else:  # the message was not sent: typed paths are found again when it is re-sent
                self.pending = [m for m in self.pending if id(m) not in auto_ids]

    def _work_label(self, media: Sequence[Media]) -> str:
        videos = [visible(m.path.name) for m in media if m.kind == "video" and not m.prepared]
        if videos:
            return f"decoding {', '.join(videos)} …"
        return "reading the images …" if any(not m.prepared for m in media) else "thinking …"

    @contextmanager
    def _sigint(self, handler: Callable[[int, Any], None]) -> Iterator[None]:
        if not self.interactive or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _answer(self, start: Callable[[threading.Event], Iterator[dict]], label: str,
                began: Callable[[], None] | None = None) -> str:  # fmt: skip
        """Run one turn's event stream on the console; ERROR when a server's answer broke off (kept).
        `began` runs once the first event came, before the answer is shown: a turn refused before it
        (over the context, a failed media decode) never reaches it."""
        cancel = threading.Event()
        streaming = threading.Event()  # from the first event to the end: the answer is on the screen

        def on_sigint(signum: int, frame: Any) -> None:
            if not streaming.is_set():
                raise KeyboardInterrupt
            # stop between tokens, keep the partial answer. Once asked (a server's stream is shut at
            # once, a model stops at its next token), more presses change nothing: raised, one landed
            # anywhere as the turn wound down, in the turn's commit (an answer kept, or dropped though
            # shown) or in the printing of its end (the text printed twice, a bare "[interrupted]")
            cancel.set()

        device = self.session.describe().memory_device  # None: the model runs elsewhere
        before = (len(self.session.turns), self.session.context_used)

        def outcome() -> str:
            if (len(self.session.turns), self.session.context_used) == before:
                return "the conversation is unchanged"
            return "the last question and its answer were removed; ask it again"  # retry drops them first

        with self._sigint(on_sigint):
            if device is not None:
                reset_peak_memory(device)
            events = None
            try:
                with self.spinner(label):
                    events = start(cancel)
                    first = next(events)
                if began is not None:
                    began()
            except KeyboardInterrupt:
                if events is not None:
                    events.close()  # see below
                if not self.interactive:
                    raise
                self.say(f"[cancelled before the answer began; {outcome()}]", "yellow")
                return OK
            stream = choose_stream(self.console, plain=self.plain)
            clean = AnswerCleaner()  # holds a \r that may be the first half of a \r\n split over two events

            ended = False

            def end_stream(after_error: bool = False) -> None:
                """The answer's last piece, then the renderer's finish(), once. finish() runs even
                when that piece fails to print (the terminal gone): it stops the live tail's drawer
                thread and Ctrl-Z hook. After an error (`after_error`, or the piece's), a failure
                of finish() is dropped: the first error is the one to report. A Ctrl-C or stop
                signal (EndedBySignal) raised meanwhile is never dropped for it: cli.py's handler
                ignores the signal once it has raised, and a --script went on to its next line."""
                nonlocal ended
                if ended:
                    return
                ended = True
                try:
                    stream.feed(clean.finish())
                except BaseException as e:
                    with suppress(Exception):
                        stream.finish()
                    if after_error and isinstance(e, Exception):
                        return
                    raise
                with suppress(Exception) if after_error else nullcontext():
                    stream.finish()

            streaming.set()
            final = None
            try:
                event = first
                while True:
                    stream.feed(clean.feed(event["text"]))
                    if event["finish_reason"] is not None:
                        final = event
                        break
                    event = next(events)
            except KeyboardInterrupt:
                try:
                    end_stream(after_error=True)  # a write failing now (its reader gone) must not replace the Ctrl-C
                finally:
                    # a Ctrl-C that lands here, between two events, leaves the turn's generator open: a
                    # /retry puts its old answer back only as that closes, so close it before telling
                    events.close()
                if not self.interactive:
                    raise
                if event["finish_reason"] is not None:  # the last text was being printed: the turn is committed
                    self.say("[interrupted while printing: the answer is kept; /retry answers again, /undo removes it]",
                             "yellow")  # fmt: skip
                    return OK
                self.say(f"[interrupted: this answer was discarded; {outcome()}]", "yellow")
                return OK
            except BaseException:  # a failed write (the terminal gone), a server's broken stream
                end_stream(after_error=True)
                raise
            finally:
                end_stream()
            self.last_peak = peak_memory(device) if device is not None else None
            return self._after_answer(final)

    def _after_answer(self, final: dict) -> str:
        reason = final["finish_reason"]
        if final.get("notice"):  # news of a server's (its context changed) or of the media sent (a video cut short)
            self.say(f"({final['notice']})", "yellow")
        if final.get("note"):  # the client stopped the answer (chat/answer_bounds.py)
            self.say(f"[stopped: {final['note']}; /retry answers again, /undo removes it]", "yellow")
        elif reason == "cancelled":
            self.say("[cancelled: the partial answer is kept; /retry answers again, /undo removes it]", "yellow")
        elif reason == "length":
            limit = self.session.max_context
            if limit is not None and self.session.context_used >= limit - 1:
                more = self.session.describe().more_room  # "" when the context is the model's own limit
                fixes = f"/undo, /clear or {more}" if more else "/undo or /clear"
                self.say(f"[stopped: the context is full; {fixes} make room]", "yellow")
            else:
                limit = self.session.params.max_new_tokens
                self.say(f"[stopped at max_new_tokens ({limit:,}); /set max_new_tokens N allows longer answers]", "yellow")
        if self.settings.ui.stats:
            self.note(self.stats_line())
        return ERROR if reason == "error" else OK  # kept, but broken off: a --script counts the line as failed

    def stats_line(self) -> str:
        if not self.session.turns:
            return ""
        turn = self.session.turns[-1]
        usage = {} if turn.answer_tokens is None else {"completion_tokens": turn.answer_tokens}
        return format_stats(turn.timing, usage, self.session.context_used, self.session.max_context,
                            self.last_peak, self.session.describe().memory_device, width=self.width,
                            approximate=not self.session.token_counts_exact)  # fmt: skip

    @contextmanager
    def _uninterruptible(self, what: str) -> Iterator[None]:
        """Re-reading a conversation (load, /system) must finish, or the cache would not match it."""
        pressed = []
        with self._sigint(lambda signum, frame: pressed.append(signum)):
            with self.spinner(what):
                yield
        if pressed:
            self.note("(Ctrl-C was ignored while the conversation was being re-read)")

    # ---- commands ---------------------------------------------------------------------------

    def cmd_help(self, command: Command) -> None:
        name = command.args[0] if command.args else None
        self.say(format_help(name, self.width))
        if name is None:
            self.note(KEYS_HELP)
            self.note("a message naming an image or video file attaches it; /set media.auto_attach false turns that off")

    def cmd_image(self, command: Command) -> None:
        paths = [found for path in command.args for found in expand_wildcards(path, self._resolve, self._places)]
        check_typed_paths(paths, self._resolve)
        before = {real_path(m.path) for m in self.pending}
        with _none_attached_said(len(paths), "image"):
            media = [self.describe(path, "image") for path in paths]
            self.attach(media)
        # `/image` sent again (Up, Enter) doubled the picture's cost without a word; attaching one
        # twice may be meant, so it is said, not refused
        seen, twice = set(before), []
        for item in media:
            key = real_path(item.path)
            if key in seen and item.path.name not in twice:
                twice.append(item.path.name)
            seen.add(key)
        if twice:
            names = ", ".join(visible(name) for name in twice[:NAMES_SHOWN]) + (" …" if len(twice) > NAMES_SHOWN else "")
            self.warn(f"{names} attached more than once; /media lists the attachments, /drop N removes one")

    def cmd_video(self, command: Command) -> None:
        frames, video_range = command.options.get("frames"), command.options.get("range")
        # `/video clips/*` said "does not exist": a pattern, as /image takes one
        paths = expand_wildcards(command.args[0], self._resolve, self._places, "video", "/video")
        with _none_attached_said(len(paths), "video"):
            media = [self.describe(path, "video", frames, video_range) for path in paths]
            self.attach(media)
        for item in media:  # said once attached: a video refused (too long for the context) needs no note first
            if item.video_range != video_range:  # the end was past the end of the video
                self.note(f"{visible(item.path.name)} ends at {item.video_range[1]:g} s, so the range ends there")

    def cmd_media(self, command: Command) -> None:
        if not self.pending:
            self.say("nothing attached; /image PATH or /video PATH attaches to the next message")
            return
        for n, media in enumerate(self.pending, start=1):
            self.say(f"{n}. {self.attach_line(media, None)[2:]}")
        total = self.session.turn_tokens(self.pending)
        self.note(f"next message: {self.approx}{total:,} tokens plus your text")

    def cmd_drop(self, command: Command) -> None:
        n = command.args[0]
        if not self.pending:
            raise UsageError("nothing is attached, so there is nothing to drop")
        if n > len(self.pending):
            held = ("only 1 is attached (/media lists it)" if len(self.pending) == 1  # not "/media lists the 1 attached"
                    else f"{len(self.pending):,} are attached (/media lists them)")
            raise UsageError(f"there is no attachment {n}: {held}")
        media = self.pending.pop(n - 1)
        self.say(f"- {media.kind} {visible(media.path.name)} detached")

    def cmd_clear(self, command: Command) -> None:
        self.session.clear()
        self.say("conversation cleared" + (f" ({counted(len(self.pending), 'attachment')} kept; /drop N removes one)" if self.pending else ""))

    def cmd_undo(self, command: Command) -> None:
        turn = self.session.undo()
        self.say(f"removed turn {len(self.session.turns) + 1}: “{one_line_excerpt(turn.user_text)}” and its answer")

    def cmd_retry(self, command: Command) -> str:
        if not self.session.turns:
            raise UsageError("nothing to retry; ask something first")
        before = len(self.session.turns)
        params = self.session.params
        note = None
        if params.seed is not None and not params.greedy:  # the seed applies per turn: the same draws again
            note = f"(seed {params.seed} gives the same answer again under the same settings; /set seed none for another)"
        elif params.greedy and not self._greedy_retry_said:
            note = (f"(temperature {params.temperature:g} gives the same answer again under the same settings; "
                    "/set temperature 0.7 for another)")  # fmt: skip

        def began() -> None:  # said once the retry runs, not before a refusal
            if note is not None:
                self.note(note)
                self._greedy_retry_said = self._greedy_retry_said or params.greedy

        try:
            return self._answer(lambda cancel: self.session.retry(self.session.params, cancel), "thinking …", began)
        except InternVLChatError as e:
            if len(self.session.turns) < before:  # retry drops the old answer before it generates
                raise type(e)(f"{e} (the last question and its answer were removed; ask it again)") from None
            raise

    def cmd_system(self, command: Command) -> None:
        if command.options.get("default"):
            self._default_system()
            return
        if not command.args:
            text, unset = self.session.system_message, self.settings.system.message is None
            if text:
                whose = " (the model's default)" if unset else ""
                self.say(f"system message{whose}: {visible_lines(text)}")
            elif self.settings.remote.server:  # unset or "": none is sent either way
                self.say("no system message is sent; the server's chat template decides")
            else:
                self.say("no system message")
            return
        text = command.args[0]
        if text in ('""', "''"):
            text = ""
        block = unwrap_block(text)  # `/system """` and lines up to `"""`
        if block is not None:
            text = block.strip()
        changed = self._change_system(text or None)
        self.settings.system.message = text
        self.settings.sources["system.message"] = "/system"
        if not text:
            self.say("system message removed")
        elif not changed:
            self.say("system message unchanged")
        else:
            self.say("system message set" + self._turns_follow())
        if changed:
            self._warn_no_room_after_system()

    def _change_system(self, text: str | None) -> bool:
        """Put `text` in use as the system message; False when it already is (the conversation was
        re-read under the same text: minutes for a long one on a CPU, and said to "now follow it")."""
        if text == self.session.system_message:
            return False
        with self._uninterruptible("re-reading the conversation …"):
            self.session.set_system(text)
        return True

    def _warn_no_room_after_system(self) -> None:
        """The conversation fits under the new system message, but may leave no room for the next
        question and its answer: say so now, as /load does, not at every question after it."""
        try:
            self.session.check_attach([])
        except ContextOverflowError:
            make = ", /undo or /clear make" if self.session.turns else " makes"
            smaller = ", or /set max_new_tokens N with a smaller N" if self.smaller_answer_makes_room() else ""
            self.warn("the context has no room for another question and its answer under this system message; a "
                      f"shorter one{make} room{smaller}")

    def answer_fills_context(self) -> bool:
        """Warn, and True, where max_new_tokens alone could fill the context: every message is refused,
        and no shorter system message, /undo or /clear makes room (only a smaller max_new_tokens)."""
        limit = self.session.max_context
        if not limit or self.session.params.max_new_tokens < limit:
            return False
        self.warn(f"the answer alone could fill the {limit:,}-token context, so every message will be refused; "
                  f"give a max_new_tokens well under {limit:,}")  # fmt: skip
        return True

    def smaller_answer_makes_room(self, pending: Sequence = ()) -> bool:
        """Whether a smaller max_new_tokens (1 at least) leaves room for the next question (a token
        of text at least) with these attachments: at the context's edge none does, and advising it
        sent the user to /set a value that is refused all the same."""
        limit = self.session.max_context
        planned = sum(tokens for _, tokens in self.session.context_items(list(pending)))
        return not limit or planned - self.session.params.max_new_tokens + 1 < limit

    def _turns_follow(self) -> str:
        """The note for a system message just changed: the turns so far now follow it (if any)."""
        turns = len(self.session.turns)
        return f"; the {counted(turns, 'turn')} so far now follow{'s' if turns == 1 else ''} it" if turns else ""

    def _default_system(self) -> None:
        """`/system --default`: the model's own system message again (unset, as at start without one);
        with a server none is sent, so its chat template's default applies."""
        default = self.session.default_system_message
        changed = self._change_system(default)
        self.settings.system.message = None
        self.settings.sources["system.message"] = "/system --default"
        follow = self._turns_follow() if changed else ""
        if self.settings.remote.server:
            self.say(f"system message unset: none is sent, so the server's chat template decides{follow}")
        elif default:
            self.say(f"system message: the model's default again{follow} (/system shows it)")
        else:
            self.say(f"system message unset: the model has no default, so none is used{follow}")
        if changed:
            self._warn_no_room_after_system()

    def cmd_set(self, command: Command) -> None:
        if not command.args:
            self._list_settings()
            return
        key = command.args[0]
        dotted = set_key(key, self.settings.remote.server)
        if len(command.args) < 2:
            self.say(f"{dotted} = {setting_text(self.settings, dotted, self.session.system_message)}  "
                     f"(from {setting_source(self.settings, dotted)})")
            section = dotted.split(".")[0]
            if section in chat_sections(self.settings)[1]:  # as /show leaves it out
                self.note(f"(not used by this chat: [{section}] is {NOT_THIS_CHATS[section]})")
            return
        value = command.args[1]
        if not changeable_while_running(dotted):
            raise UsageError(read_at_start(dotted, self.settings.remote.server))
        if dotted == "system.message":
            self.cmd_system(Command("system", (value,)))
            if value.strip().lower() in UNSET_WORDS:  # as `/set seed none` unsets the seed
                self.note("(that text is the system message now; /system --default restores the model's default, "
                          "/system '' removes it)")
            return
        old, old_source = self.settings.get(dotted), self.settings.sources.get(dotted)
        self.settings.set(dotted, value)
        try:
            if dotted.startswith("generation."):
                self.session.params = params_from_settings(self.settings)
                self.session.stream_interval = self.settings.generation.stream_interval
        except InternVLChatError:
            self.settings.set(dotted, old, source=old_source or "default")
            raise
        if dotted == "ui.plain":  # Markdown and spinners read it as they start; the colours are the console's
            if self.remake_console is not None:
                self.console = self.remake_console()
            else:
                self.console.no_color = self.settings.ui.plain or self._colour_off
        self.say(f"{dotted} = {setting_text(self.settings, dotted, self.session.system_message)}")
        if dotted.startswith("media."):
            self.note("applies to the next attachments")
        # an answer that alone fills the context is said now (answer_fills_context warns), not only
        # when the next message is refused for it
        if dotted == "generation.max_new_tokens" and not self.answer_fills_context():
            try:
                self.session.check_attach([])
            except ContextOverflowError:  # the conversation so far (or the system message alone) leaves no room
                # at the context's edge no max_new_tokens (1 at least) makes room: not advised then
                smaller = ", or give a smaller max_new_tokens" if self.smaller_answer_makes_room() else ""
                if self.session.turns:
                    self.warn(f"the context has no room for another question and an answer this long; /undo or /clear "
                              f"make room{smaller}")
                else:
                    self.warn("the context has no room for a question and an answer this long under this system "
                              f"message; a shorter one (/system) makes room{smaller}")

    def _list_settings(self) -> None:
        """`/set` alone: each setting it can change, its value and where the value came from."""
        table, cut = settings_table(self.settings, self.session.system_message, self.width)
        self.say("settings /set can change:", "bold")
        self.say(table)
        if cut:
            self.note("(… marks a value cut short; /set KEY shows it whole)")

    def cmd_show(self, command: Command) -> None:
        view = self.session.last_prompt()
        if view is not None:
            extra = f" ({view.note})" if view.note else ""
            self.say(f"last prompt, turn {view.turn}{extra}:", "bold")
            self.say(visible_lines(view.text))  # the text may come from a session file
        else:
            self.say("no prompt sent yet", "bold")
        self.say("settings:", "bold")
        unset = {"system.message": unset_system(self.settings, self.session.system_message, LISTED_VALUE_WIDTH)}  # as /set says
        shown, left_out = chat_sections(self.settings)  # [serve] listed here, and [remote] without a server, read as in use
        self.say(format_settings(self.settings, unset, shown).rstrip("\n"))
        self.note(left_out_note(left_out))

    def _used_text(self, used: int, verb: str = "used") -> str:
        """`2,480 of 8,192 tokens used (30 %)`, with ≈ for estimates and without an unknown limit."""
        limit = self.session.max_context
        if not limit:
            return f"{self.approx}{used:,} tokens {verb} (the server's limit is not known)"
        return f"{self.approx}{used:,} of {limit:,} tokens {verb} ({percent(used / limit)})"

    def cmd_context(self, command: Command) -> None:
        self.say(f"context: {self._used_text(self.session.context_used)}", "bold")
        items = self.session.context_items(self.pending)
        planned = sum(tokens for _, tokens in items)
        rows = [(visible(name), f"{self.approx}{tokens:,}") for name, tokens in items]  # names hold file names and text
        self.say(format_columns(rows, self.width, indent=2, align_right=True))
        limit = self.session.max_context
        # the items count an empty message, which is never sent: at `limit` no text is left room
        if limit and planned >= limit:  # the app refuses the next question, whatever its text
            fixes = (["/drop N removes an attachment"] if self.pending else []) + (["/undo or /clear make room"] if self.session.turns else [])
            if self.smaller_answer_makes_room(self.pending) or not fixes:
                fixes.append("/set max_new_tokens N with a smaller N")
            self.warn(f"the next question and its answer need more than {self.approx}{planned:,} tokens, over the "
                      f"{limit:,}-token context; {any_of(fixes)}")
        else:
            self.say(f"  at most, after the next answer: {self._used_text(planned, 'held')}")
        if self.approx:
            self.note("  (estimates: the server counts the real tokens, and reports them after each answer)")

    def cmd_stats(self, command: Command) -> None:
        if not self.session.turns:
            self.say("no answer yet")
            return
        if not self.session.turns[-1].timing:  # session files keep no timings: they are this run's
            self.say("no stats for the last answer: it was loaded from a session file; the next answer has them")
            return
        rows = stats_rows(self.session.turns[-1], self.session.describe(), self.session.context_used,
                          self.session.max_context, self.approx, self.last_peak)  # fmt: skip
        self.say(format_columns(rows, self.width))

    def cmd_exit(self, command: Command) -> str:
        return EXIT

