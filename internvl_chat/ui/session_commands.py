"""The app's session-file commands: `/save`, `/load` and `/export`, with what keeps a file safe
from being replaced by accident (a file is replaced silently only when this conversation wrote it;
else the REPL asks and a script needs --force) and `/load`'s report of what it restored.

A mixin of `App` (ui/app.py): it uses the app's conversation (`session`), `settings`, printing
(`say`, `warn`, `note`, `spinner`), `confirm` and path resolution (`_resolve`, `_output_path`).
"""

from __future__ import annotations

import copy
import os
import weakref
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.cells import cell_len

from ..chat.sampling import params_from_settings
from ..errors import ContextOverflowError, UsageError
from ..files import PRIVATE_FILE_MODE, NoHomeFolder, is_special_file, visible, write_atomic
from ..numbers import counted
from .commands import Command, close_names
from .export import answer_and_cut, export_markdown
from .paths import quote_path
from .saved_sessions import (RESTORED_SETTINGS, default_sessions_dir, file_date, message_media, recent_sessions,
                             saved_messages, session_at_a_glance)
from .settings_text import plain_value
from .text_wrap import one_line_excerpt, pad_cells

NOT_SESSION_SUFFIXES = (".md", ".markdown", ".txt")  # what /save refuses: /export writes these
LEFT_OUT_SHOWN = 10  # files /load --skip-missing names as left out; the rest are counted


def _typed(path: Path | str) -> str:
    """A path in a hint, quoted as the command line reads it back (and shown inert)."""
    return visible(quote_path(path))


def _refuse_special_file(path: Path) -> None:
    """A FIFO or a device at an output path is never replaced (write_atomic refuses it): say so at
    once, instead of offering --force (or asking y/N) for a write that then fails."""
    if is_special_file(path):
        raise UsageError(f"{visible(str(path))} is not a regular file (a device or a pipe?); give the name of a file")


def _closest_sessions(raw: Path, folder: Path) -> str:
    """"did you mean chat1 or chat-2? " for a name like a few saved in `folder`, else ""."""
    typed = raw.stem if raw.suffix == ".json" else raw.name
    close = close_names(typed, [path.stem for path, _ in recent_sessions(folder)], most=3)
    if not close:
        return ""
    shown = [_typed(name) for name in close]
    return f"did you mean {', '.join(shown[:-1]) + ' or ' if len(shown) > 1 else ''}{shown[-1]}? "


class SessionFileCommands:
    # The file this conversation was last saved to or loaded from, and its first turn then
    # (a conversation is "the same" while that turn still opens it; see `_file_mark`).
    _session_file: tuple[Path, weakref.ref | None] | None = None
    # The Markdown file /export last wrote, and the conversation's first turn then: re-exporting
    # the same conversation there replaces it without asking.
    _export_file: tuple[Path, weakref.ref | None] | None = None
    # The turns as last saved or loaded (App.__init__ starts it empty): what /load would discard unsaved
    _saved_turns: list[tuple[str, str]]

    def cmd_save(self, command: Command) -> None:
        """`/save [FILE] [--force]`: FILE relative to the working folder; none: the sessions folder.

        A file holding another conversation is not replaced silently: the REPL asks, a script
        refuses unless --force is given. Re-saving this conversation to its own file is fine.
        """
        path = self._output_path(command.args[0]) if command.args else self._default_save_path()
        if path.suffix.lower() in NOT_SESSION_SUFFIXES:  # a session written under a Markdown or text name
            as_json = _typed(str(Path(command.args[0]).with_suffix(".json")))
            raise UsageError(f"a session file is JSON, so /save does not write {visible(path.name)}; /save {as_json} "
                             f"saves the session, /export {_typed(command.args[0])} writes the conversation as Markdown")
        if path.is_dir():
            raise UsageError(f"{visible(str(path))} is a folder; give a file name, e.g. /save {_typed(path / 'chat.json')}")
        if not command.options.get("force") and not self._may_replace(path):
            self.say("not saved")
            return
        saved = self.session.save(path, self.settings.to_dict())
        self._session_file = self._file_mark(saved)
        self._saved_turns = self._turn_texts()
        if not self.session.turns:  # after the save: a save that fails must not first say it goes ahead
            self.warn("the conversation is empty; saved it anyway")
        self.say(f"saved {counted(len(self.session.turns), 'turn')} to {visible(str(saved))}")
        if self.pending:  # a session holds the turns sent: attachments waiting for a message were left out unsaid
            self.warn(_pending_not_saved(self.pending))

    def _default_save_path(self) -> Path:
        """This conversation's file in the sessions folder, or a new dated one there."""
        folder = default_sessions_dir()
        current = self._current_file()
        if current is not None and current.parent == Path(os.path.abspath(folder)):
            return current
        path = folder / f"session-{datetime.now():%Y%m%d-%H%M%S}.json"
        n = 1
        while os.path.lexists(path):
            n += 1
            path = folder / f"session-{datetime.now():%Y%m%d-%H%M%S}-{n}.json"
        return path

    def _file_mark(self, path: Path) -> tuple[Path, weakref.ref | None]:
        """(the absolute path, the conversation's first turn now): see `_still_this_conversations`.
        The turn is held weakly: a conversation replaced by /load or /clear must not stay alive
        for the mark, with its pictures' features (hundreds of MB on a long session)."""
        turns = self.session.turns
        return Path(os.path.abspath(path)), weakref.ref(turns[0]) if turns else None

    def _still_this_conversations(self, mark: tuple[Path, weakref.ref | None] | None) -> Path | None:
        """The marked file, while the conversation that wrote it is still this one (its first turn
        still opens it)."""
        if mark is None:
            return None
        path, first = mark
        if first is None:
            return path
        turns = self.session.turns
        return path if turns and turns[0] is first() else None

    def _current_file(self) -> Path | None:
        """The file this conversation was saved to or loaded from, while it is still that conversation."""
        return self._still_this_conversations(self._session_file)

    def _may_replace(self, path: Path) -> bool:
        """True when `path` is free, is this conversation's file, or the user agrees to replace it."""
        if not os.path.lexists(path) or self._current_file() == Path(os.path.abspath(path)):
            return True
        _refuse_special_file(path)
        held = saved_messages(path)
        if held is not None and self._continues(held):
            return True  # the file holds an earlier state of this very conversation
        what = (f"another conversation ({counted(len(held) // 2, 'turn')})" if held is not None
                else "a link to a file that does not exist (or a loop of links)" if not os.path.exists(path)
                else "a file that is not an internvl-chat session")  # fmt: skip
        shown = visible(str(path))
        if self.confirm is None:
            raise UsageError(f"{shown} already holds {what}; /save {_typed(path)} --force replaces it, or give another name")
        return self.confirm(f"{shown} holds {what}; replace it? [y/N] ")

    def _continues(self, held: list[tuple[Any, Any, Any]]) -> bool:
        # as this conversation saves, its pictures and videos too
        ours = [(m["role"], m["text"], message_media(m)) for m in self.session.to_json()["messages"]]
        return len(held) <= len(ours) and ours[: len(held)] == held

    def cmd_load(self, command: Command) -> None:
        """`/load NAME`: a path, or a name in the sessions folder (.json optional); `/load`: the list."""
        if not command.args:
            self._list_sessions()
            return
        path = self._find_session(command.args[0])
        shown = visible(str(path))
        # reading and checking touch nothing, so Ctrl-C may stop them; the replay must finish
        with self.spinner(f"reading {visible(path.name)} …"):
            readied = self.session.read_saved(path, bool(command.options.get("skip-missing")))
        source = f"session {visible(path.name)}"
        changes = self._session_setting_changes(readied.saved.settings, source)
        if not self._may_discard_conversation(f"load {visible(path.name)}"):
            self.say("not loaded")
            return
        system_before = self.session.system_message
        with self._uninterruptible(f"loading {visible(path.name)} …"):
            self.session.restore(readied)
        for key, _, new in changes:
            self.settings.set(key, new, source=source)
        if changes:
            self.session.params = params_from_settings(self.settings)
        if self.session.system_message != system_before:
            self.settings.system.message = self._system_setting()
            self.settings.sources["system.message"] = source
        # loaded without some media it is not the file's conversation: a plain /save then writes a
        # new file, and the file that still names them is replaced only when the user agrees
        self._session_file = None if readied.left_out else self._file_mark(path)
        self._saved_turns = self._turn_texts()

        turns = self.session.turns
        limit = self.session.max_context
        self.say(f"loaded {counted(len(turns), 'turn')} from {shown} · context {self.approx}{self.session.context_used:,}"
                 + (f"/{limit:,}" if limit else "")
                 + (f" ({counted(len(self.pending), 'attachment')} kept; /drop N removes one)" if self.pending else ""))  # as /clear says
        if readied.left_out:
            shown = readied.left_out[:LEFT_OUT_SHOWN]  # names escaped by `visible`
            listed = ", ".join(f"{m.name} (turn {m.turn})" for m in shown)
            if len(readied.left_out) > len(shown):  # a folder of pictures moved away: one line, not thousands of names
                listed += f" and {len(readied.left_out) - len(shown):,} more"
            self.warn(f"left out {counted(len(readied.left_out), 'file')} that vanished or changed: {listed}")
        if changes:
            listed = ", ".join(f"{key.split('.')[1]} {plain_value(new)} (was {plain_value(old)})" for key, old, new in changes)
            self.note(f"settings from the session: {listed}")
        if self.session.system_message != system_before:
            self.note(self._loaded_system_note())
        saved_model, model = readied.saved.model, self.session.describe().model
        if saved_model and saved_model != model:
            self.note(f"(it was saved with {visible(saved_model)}; it continues with {visible(model)})")
        if turns:
            answer, cut = answer_and_cut(turns[-1])  # the excerpt may end before a " [cancelled]"
            if turns[-1].finish_reason == "error":  # the file keeps no "[stopped: …]" line: say what to do again
                cut += "; /retry answers again, /undo removes it"
            self.note(f"last: “{one_line_excerpt(turns[-1].user_text)}” → “{one_line_excerpt(answer)}”" + (f" (cut short: {cut})" if cut else ""))
        if self.answer_fills_context():  # its max_new_tokens (from the session) is this context's size or more
            return
        try:
            self.session.check_attach([])
        except ContextOverflowError:  # it filled the context when it was saved, or this one is smaller
            smaller = ", or /set max_new_tokens N with a smaller N" if self.smaller_answer_makes_room() else ""
            if turns:
                self.warn(f"the context has no room for another question and its answer; /undo or /clear make room{smaller}")
            else:  # saved before its first question: only its system message takes room
                self.warn("the context has no room for a question and its answer under this system message; a shorter "
                          f"one (/system) makes room{smaller}")

    def _loaded_system_note(self) -> str:
        """The note for a system message the loaded session changed: a session saved from a server
        may hold none (the server's default), and then there is no saved text to be in use."""
        if self.settings.remote.server and self.session.system_message is None:
            return "the session was saved with no system message: none is sent, so the server's chat template decides"
        return "the system message saved with the session is in use (/system shows it)"

    def _system_setting(self) -> str | None:
        """system.message for the system message in use: unset when it is the model's default (a
        file saved after `/system --default` holds the checkpoint's text, or none for a server's
        default), so /set and /show say so; "" when there is none."""
        system = self.session.system_message
        return None if system == self.session.default_system_message else system or ""

    def _turn_texts(self) -> list[tuple[str, str]]:
        return [(turn.user_text, turn.answer_text) for turn in self.session.turns]

    def _may_discard_conversation(self, doing: str) -> bool:
        """True when nothing unsaved would be lost, or the user agrees to lose it (a script never asks)."""
        turns = self._turn_texts()
        if self.confirm is None or not turns or turns == self._saved_turns:
            return True
        return self.confirm(f"the conversation so far ({counted(len(turns), 'turn')}) is not saved; {doing} anyway? [y/N] ")

    def _session_setting_changes(self, saved: dict[str, Any], source: str) -> list[tuple[str, Any, Any]]:
        """[(key, old, new)] for the session's generation and media values that differ from ours,
        checked on a copy of the settings: a bad value raises UsageError naming the key, before
        anything was changed."""
        trial = copy.deepcopy(self.settings)
        changes = []
        for key in RESTORED_SETTINGS:
            section, name = key.split(".")
            table = saved.get(section, {})
            if name in table:
                trial.set(key, table[name], source=source)
                old, new = self.settings.get(key), trial.get(key)
                if old != new or type(old) is not type(new):
                    changes.append((key, old, new))
        params_from_settings(trial)  # the values must also be valid together
        return changes

    def _find_session(self, raw: Path) -> Path:
        """A path as given (.json optional), else a file of that name in the sessions folder."""
        raw = Path(raw)
        gone: UsageError | None = None
        try:
            candidates = [self._resolve(raw)]
            if not raw.suffix:
                candidates.append(self._resolve(Path(f"{raw}.json")))
        except UsageError as e:  # the working folder is gone: a name in the sessions folder still loads
            candidates, gone = [], e
        try:
            folder: Path | None = default_sessions_dir()
        except NoHomeFolder:  # no home folder: a path still loads
            folder = None
        if folder is not None and not raw.is_absolute() and len(raw.parts) == 1:
            candidates += [folder / raw.name, folder / f"{raw.name}.json"]
        for candidate in candidates:
            if os.path.lexists(candidate):
                return candidate
        if gone is not None:
            raise gone
        if folder is None:
            raise UsageError(f"there is no session {visible(str(raw))} here; check the path")
        hint = _closest_sessions(raw, folder) if not raw.is_absolute() and len(raw.parts) == 1 else ""
        raise UsageError(f"there is no session {visible(str(raw))} here or in {visible(str(folder))}; "
                         f"{hint}/load alone lists the saved ones")  # fmt: skip

    def _list_sessions(self, limit: int = 10) -> None:
        folder = default_sessions_dir()
        sessions = recent_sessions(folder)
        if not sessions:
            self.say(f"no saved sessions in {visible(str(folder))}; /save saves the conversation there")
            return
        self.say(f"saved sessions in {visible(str(folder))}, newest first:", "bold")
        shown = sessions[:limit]
        width = max(cell_len(_typed(p.stem)) for p, _ in shown)
        for path, mtime in shown:
            held, why = session_at_a_glance(path)
            self.say(f"  {pad_cells(_typed(path.stem), width)}  {held:<11}  {file_date(mtime)}" + (f"  ({why})" if why else ""))
        more = f" ({len(sessions) - limit} older not shown)" if len(sessions) > limit else ""
        self.note(f"/load NAME loads one (Tab completes the names){more}")

    def cmd_export(self, command: Command) -> None:
        """`/export FILE.md [--force]`: an existing file is replaced only when this conversation
        wrote it, or with the user's yes (REPL) or --force (script), as /save does."""
        path = self._output_path(command.args[0])
        if path.suffix.lower() == ".json":  # Markdown under a session's name: /load then calls it no session
            as_md = _typed(str(Path(command.args[0]).with_suffix(".md")))
            raise UsageError(f"an export is Markdown, so /export does not write {visible(path.name)}; /export {as_md} "
                             f"writes the conversation as Markdown, /save {_typed(command.args[0])} saves the session")
        if path.is_dir():
            raise UsageError(f"{visible(str(path))} is a folder; give a file name, e.g. /export {_typed(path / 'chat.md')}")
        if not command.options.get("force") and not self._may_export_to(path):
            self.say("not exported")
            return
        # a symlink at the target is replaced, never followed; a file name that is not UTF-8 keeps its bytes
        write_atomic(path, export_markdown(self.session).encode("utf-8", "surrogateescape"), PRIVATE_FILE_MODE)
        self._export_file = self._file_mark(path)
        if not self.session.turns:  # as /save says it, once written: an export of nothing is rarely what was meant
            self.warn("the conversation is empty; exported it anyway")
        self.say(f"exported {counted(len(self.session.turns), 'turn')} to {visible(str(path))}")

    def _may_export_to(self, path: Path) -> bool:
        """True when `path` is free, holds this conversation's last export, or the user agrees."""
        if not os.path.lexists(path) or self._still_this_conversations(self._export_file) == Path(os.path.abspath(path)):
            return True
        _refuse_special_file(path)
        shown = visible(str(path))
        if self.confirm is None:
            raise UsageError(f"{shown} already exists; /export {_typed(path)} --force replaces it, or give another name")
        return self.confirm(f"{shown} already exists; replace it? [y/N] ")


def _pending_not_saved(pending: list) -> str:
    from .app import media_names  # app.py imports this module

    held, them = ("is", "it") if len(pending) == 1 else ("are", "them")
    return (f"{media_names(pending)}, attached for the next message, {held} not in the saved session; "
            f"send a message with {them}, then /save again")
