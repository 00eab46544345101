"""/save, /load and /export in the app: the sessions folder, never replacing another conversation
silently, settings restored with the session, and nothing from a file reaching the terminal raw."""

from __future__ import annotations

import errno
import functools
import gc
import json
import os
import re
import threading
import stat
import weakref
from pathlib import Path

import pytest
from PIL import Image

from internvl_chat.ui.answer_text import sanitize
from internvl_chat.ui.app import ERROR, OK
from internvl_chat.ui.export import export_block
from internvl_chat.ui.saved_sessions import default_sessions_dir
from media_helpers import textured_rgb
from app_helpers import make_app as _make_app
from app_helpers import output

make_app = functools.partial(_make_app, max_new_tokens=6)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    return tmp_path / "home"


def test_save_without_a_name_goes_to_the_sessions_folder_and_load_finds_it_by_name(loaded, tmp_path, home):
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    assert app.handle_line("/save") == OK
    folder = default_sessions_dir()
    assert folder == home / ".local" / "state" / "internvl-chat" / "sessions"
    (saved,) = folder.glob("session-*.json")
    app.handle_line("More.")
    assert app.handle_line("/save") == OK  # the same conversation: the same file again
    assert list(folder.glob("*.json")) == [saved] and len(json.loads(saved.read_text())["messages"]) == 4
    output(out)

    other, out2 = make_app(loaded, tmp_path)
    assert other.handle_line(f"/load {saved.stem}") == OK  # a name in the folder, .json optional
    assert [t.user_text for t in other.session.turns] == ["Hello.", "More."]
    assert other.handle_line(f"/load {saved.name}") == OK
    (tmp_path / "here.json").write_text(saved.read_text())
    assert other.handle_line("/load here") == OK  # the working folder first
    assert other.handle_line("/load nothing-here") == ERROR
    assert "there is no session nothing-here here or in" in output(out2)

    other.handle_line("/clear")
    other.handle_line("A new conversation.")
    other.handle_line(f"/save {folder / 'second.json'}")
    output(out2)
    assert other.handle_line("/load") == OK  # the list, newest first, with turn counts and dates
    listing = output(out2).splitlines()
    assert listing[0] == f"saved sessions in {folder}, newest first:"
    rows = [line.split() for line in listing[1:3]]
    assert [(r[0], r[1]) for r in rows] == [("second", "1"), (saved.stem, "2")]
    assert "/load NAME" in listing[-1]


def test_a_session_file_dated_past_any_calendar_is_listed_and_completed(loaded, tmp_path, home, monkeypatch):
    """A file's time comes with it (an archive keeps it); on tmpfs, btrfs or XFS it can be a year past
    9999, where datetime raised ValueError: /load's list and its Tab completion ended the app."""
    from internvl_chat.ui import session_commands
    from internvl_chat.ui import repl

    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    assert app.handle_line(f"/save {default_sessions_dir() / 'far.json'}") == OK
    real = session_commands.recent_sessions

    def far_future(folder):
        return [(path, 1e12) for path, _ in real(folder)]  # the year 33658

    monkeypatch.setattr(session_commands, "recent_sessions", far_future)
    monkeypatch.setattr(repl, "recent_sessions", far_future)
    output(out)
    assert app.handle_line("/load") == OK
    assert re.search(r"^  far +1 turn +\?$", output(out), re.M)
    assert [c.display_meta_text for c in repl.complete_session("fa")] == ["?"]


def test_load_says_that_attachments_waiting_for_a_message_are_kept(loaded, tmp_path, home):
    # they stayed attached without a word (as /clear says it), to go with the loaded conversation's next question
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    app.handle_line("/save chat.json")
    Image.fromarray(textured_rgb(64, 64, seed=3)).save(tmp_path / "pic.png")
    app.handle_line("/image pic.png")
    output(out)
    assert app.handle_line("/load chat.json") == OK
    first = output(out).splitlines()[0]
    assert first.startswith("loaded 1 turn from ") and first.endswith(" (1 attachment kept; /drop N removes one)")
    assert len(app.pending) == 1


@pytest.mark.parametrize("name", ["notes.md", "notes.MARKDOWN", "notes.txt", "my notes.md"])
def test_save_to_a_markdown_or_text_name_is_refused_with_what_to_do(loaded, tmp_path, home, name):
    """/save notes.md wrote a JSON session under a Markdown name; /export writes Markdown."""
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    output(out)
    typed = f'"{name}"' if " " in name else name
    assert app.handle_line(f"/save {typed} --force") == ERROR
    lines = output(out).strip().splitlines()
    as_json = str(Path(name).with_suffix(".json"))
    as_json = f"'{as_json}'" if " " in as_json else as_json
    assert lines == [f"error: a session file is JSON, so /save does not write {name}; /save {as_json} saves "
                     f"the session, /export {typed.replace(chr(34), chr(39))} writes the conversation as Markdown"]  # fmt: skip
    assert not (tmp_path / name).exists()
    assert app.handle_line(f"/export {typed}") == OK and (tmp_path / name).read_text().startswith("# Conversation")
    assert app.handle_line("/save notes") == OK and json.loads((tmp_path / "notes").read_text())


def test_export_to_a_session_name_is_refused_with_what_to_do(loaded, tmp_path, home):
    """/export chat.json wrote Markdown under a session's name (/load then called it no session)."""
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    output(out)
    assert app.handle_line("/export 'my chat.JSON' --force") == ERROR
    assert output(out) == ("error: an export is Markdown, so /export does not write my chat.JSON; /export 'my chat.md' "
                           "writes the conversation as Markdown, /save 'my chat.JSON' saves the session\n")  # fmt: skip
    assert list(tmp_path.glob("my chat*")) == [] and len(app.session.turns) == 1


def test_save_never_silently_replaces_another_conversation(loaded, tmp_path, home):
    first, _ = make_app(loaded, tmp_path)
    first.handle_line("The first conversation.")
    assert first.handle_line("/save talk.json") == OK
    original = (tmp_path / "talk.json").read_text()

    second, out = make_app(loaded, tmp_path)  # a script: no one to ask
    second.handle_line("Another conversation.")
    output(out)
    assert second.handle_line("/save talk.json") == ERROR
    message = output(out).strip()
    assert message.startswith(f"error: {tmp_path / 'talk.json'} already holds another conversation (1 turn)")
    assert "--force" in message and (tmp_path / "talk.json").read_text() == original
    (tmp_path / "notes.log").write_text("my notes")
    assert second.handle_line("/save notes.log") == ERROR
    assert "a file that is not an internvl-chat session" in output(out)

    asked = []
    second.confirm = lambda question: asked.append(question) or False  # the REPL asks; "no"
    assert second.handle_line("/save talk.json") == OK
    assert "replace it? [y/N]" in asked[0] and "not saved" in output(out)
    assert (tmp_path / "talk.json").read_text() == original
    second.confirm = lambda question: True
    assert second.handle_line("/save talk.json") == OK
    assert json.loads((tmp_path / "talk.json").read_text())["messages"][0]["text"] == "Another conversation."

    first.confirm = None
    assert first.handle_line("/save talk.json --force") == OK  # a script can force it
    assert json.loads((tmp_path / "talk.json").read_text())["messages"][0]["text"] == "The first conversation."
    first.handle_line("Go on.")
    assert first.handle_line("/save talk.json") == OK  # its own file, continued: no question
    third, _ = make_app(loaded, tmp_path)
    assert third.handle_line("/load talk.json") == OK
    third.handle_line("And on.")
    assert third.handle_line("/save talk.json") == OK  # loaded from there: the same conversation
    # a file an earlier run saved of this very conversation (its first turn) is replaced without a question
    earlier = third.session.to_json()
    earlier["messages"] = earlier["messages"][:2]
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    third.confirm = None
    assert third.handle_line("/save earlier.json") == OK


def test_stats_after_load_say_the_answer_was_loaded(loaded, tmp_path, home):
    """/stats after /load said "no answer yet", with the loaded answers on the screen."""
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("/stats") == OK and output(out).strip() == "no answer yet"
    app.handle_line("Hello.")
    app.handle_line(f"/save {tmp_path / 'talk.json'}")
    other, out2 = make_app(loaded, tmp_path)
    assert other.handle_line(f"/load {tmp_path / 'talk.json'}") == OK
    output(out2)
    assert other.handle_line("/stats") == OK
    assert output(out2).strip() == "no stats for the last answer: it was loaded from a session file; the next answer has them"
    other.handle_line("More.")
    output(out2)
    other.handle_line("/stats")
    assert output(out2).startswith("finish")


def test_load_restores_the_settings_saved_with_the_session(loaded, tmp_path, home):
    app, _ = make_app(loaded, tmp_path)
    for line in ("/set temperature 0.7", "/set top_k 40", "/set seed 7", "/set max_tiles 4", "/set max_new_tokens 5"):
        assert app.handle_line(line) == OK
    app.handle_line("Hello.")
    app.handle_line(f"/save {tmp_path / 'warm.json'}")

    fresh, out = make_app(loaded, tmp_path)
    assert fresh.handle_line(f"/load {tmp_path / 'warm.json'}") == OK
    g = fresh.settings.generation
    assert (g.temperature, g.top_k, g.seed, g.max_new_tokens, fresh.settings.media.max_tiles) == (0.7, 40, 7, 5, 4)
    assert fresh.session.params.temperature == 0.7 and fresh.session.params.seed == 7
    assert fresh.settings.sources["generation.seed"] == "session warm.json"
    said = out.getvalue()
    assert "settings from the session: temperature 0.7 (was 0.0), top_k 40 (was 0), max_new_tokens 5 (was 6), seed 7 (was unset)" in said
    assert "max_tiles 4 (was unset)" in said  # unset: the checkpoint's own limit

    data = json.loads((tmp_path / "warm.json").read_text())
    data["settings"]["generation"]["seed"] = 2**64  # outside the generator's range
    (tmp_path / "bad.json").write_text(json.dumps(data))
    other, out2 = make_app(loaded, tmp_path)
    other.handle_line("Hi.")
    before = (list(other.session.ids), other.settings.to_dict())
    assert other.handle_line(f"/load {tmp_path / 'bad.json'}") == ERROR
    assert "session bad.json generation.seed: must be an integer from 0 to 2**63-1" in out2.getvalue()
    assert (other.session.ids, other.settings.to_dict()) == before


def test_export_replaces_a_symlink_instead_of_writing_through_it(loaded, tmp_path, home):
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "talk.md").symlink_to(victim)
    assert app.handle_line("/export talk.md --force") == OK
    assert victim.read_text() == "precious"
    assert not (tmp_path / "talk.md").is_symlink() and "## User" in (tmp_path / "talk.md").read_text()


_FREE_SPACE = "free some disk space, or give a path on another disk"


@pytest.mark.parametrize("code, said", [
    (errno.EACCES, "cannot use {path}: {why}; check the path and its permissions"),
    # a full disk said "No space left on device; check the path and its permissions"
    (errno.ENOSPC, "cannot write {path}: {why}; " + _FREE_SPACE),
    (errno.EDQUOT, "cannot write {path}: {why}; " + _FREE_SPACE),
    (errno.EROFS, "cannot write {path}: {why}; give a path on another disk"),
    (errno.EFBIG, "cannot write {path}: {why}; raise the file-size limit (ulimit -f)"),
])  # fmt: skip
def test_write_errors_name_the_users_path_never_a_temporary_file_and_say_what_to_do(loaded, tmp_path, home, monkeypatch,
                                                                                      code, said):  # fmt: skip
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")

    def refuse(source, target):
        raise OSError(code, os.strerror(code), source)  # the temporary file's name, which the line must not show

    monkeypatch.setattr("os.replace", refuse)
    output(out)
    for command, name in (("/save chat.json", "chat.json"), ("/export chat.md", "chat.md")):
        assert app.handle_line(command) == ERROR
        assert output(out).strip() == "error: " + said.format(path=tmp_path / name, why=os.strerror(code))
    assert list(tmp_path.iterdir()) == []  # no temporary files left


def test_a_path_too_long_for_the_file_system_is_cut_short_in_its_error(loaded, tmp_path, home):
    # the 5,000-character name came back whole after "cannot use", with advice about permissions
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    output(out)
    for command in ("/save x.json", "/export x.md", "/image x.png"):
        name, suffix = command.split(" x")
        assert app.handle_line(f"{name} {tmp_path / ('x' * 5000)}{suffix}") == ERROR
        said = output(out).strip()
        shown = f"image {tmp_path}" if name == "/image" else tmp_path
        assert said.startswith(f"error: cannot use {shown}/xxx") and "\n" not in said and len(said) < 200, said
        assert said.endswith("…: the path is too long for the file system; give a shorter one")


def test_save_over_a_link_to_nothing_says_what_is_there(loaded, tmp_path, home):
    # a link to a file that does not exist "already holds a file that is not an internvl-chat session"
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    (tmp_path / "chat.json").symlink_to(tmp_path / "gone.json")
    output(out)
    assert app.handle_line("/save chat.json") == ERROR
    assert output(out) == (f"error: {tmp_path / 'chat.json'} already holds a link to a file that does not exist (or a "
                           f"loop of links); /save {tmp_path / 'chat.json'} --force replaces it, or give another name\n")
    assert app.handle_line("/save chat.json --force") == OK  # the link is replaced, nothing is written through it
    assert not (tmp_path / "chat.json").is_symlink() and not (tmp_path / "gone.json").exists()


def test_session_and_export_files_are_private_like_the_history(loaded, tmp_path, home):
    # sessions were written 0644 in folders made 0755: what was typed and answered was readable by
    # every user of the machine, while the history file, holding the same lines, is kept 0600
    app, out = make_app(loaded, tmp_path)
    app.handle_line("My bank PIN is 1234.")
    assert app.handle_line("/save") == OK
    (saved,) = default_sessions_dir().glob("*.json")
    shared = tmp_path / "shared.json"
    shared.write_text("{}")
    shared.chmod(0o644)
    assert app.handle_line(f"/save {shared} --force") == OK
    assert app.handle_line(f"/save {tmp_path / 'new' / 'deeper' / 'chat.json'}") == OK
    assert app.handle_line(f"/export {tmp_path / 'new' / 'chat.md'}") == OK  # an export holds the same text
    for path in (saved, shared, tmp_path / "new" / "deeper" / "chat.json", tmp_path / "new" / "chat.md"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in (default_sessions_dir(), tmp_path / "new", tmp_path / "new" / "deeper"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    output(out)
    assert app.handle_line(f"/save {shared}/chat.json") == ERROR  # a file where a folder must be: said so
    assert output(out).strip() == f"error: cannot use {shared}: a file, not a folder; check the path and its permissions"


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u202eevil"


def test_nothing_from_a_session_file_drives_the_terminal(loaded, tmp_path, home):
    picture = tmp_path / f"cat{HOSTILE}.png"
    Image.fromarray(textured_rgb(448, 448, seed=3)).save(picture)
    app, _ = make_app(loaded, tmp_path)
    media = app.describe(picture)
    app.attach([media])
    app.handle_line(f"What is this? {HOSTILE}")
    app.handle_line(f"/system Be brief. {HOSTILE}")
    app.handle_line(f"/save {tmp_path / 'hostile.json'}")
    data = json.loads((tmp_path / "hostile.json").read_text())
    data["model"] = f"/models/{HOSTILE}"
    (tmp_path / "hostile.json").write_text(json.dumps(data))

    other, out = make_app(loaded, tmp_path)
    for line in (f"/load {tmp_path / 'hostile.json'}", "/show", "/context", "/system", "/undo", "/load /no/such.json"):
        other.handle_line(line)
    said = out.getvalue()
    assert "\x1b" not in said and "\x07" not in said and "\u202e" not in said
    assert "cat\\e]0;pwned\\x07\\e[2J\\u202eevil.png" in said  # shown, inert


def test_a_session_file_shows_no_control_or_bidi_character_raw(loaded, tmp_path, home):
    # JSON escapes only C0 controls: a C1 CSI (U+009B), DEL or a bidi override in a message was
    # written raw, so `cat chat.json` could drive or reorder the terminal
    app, out = make_app(loaded, tmp_path)
    text = "left \u009b2J \x7f \u202eevil\u2066 \u200b \x1b[31m right"
    app.handle_line(text)
    assert app.handle_line(f"/save {tmp_path / 'chat.json'}") == OK
    raw = (tmp_path / "chat.json").read_text(encoding="utf-8")
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]", raw)
    assert "\\u009b2J \\u007f \\u202eevil\\u2066 \\u200b \\u001b[31m" in raw
    other, _ = make_app(loaded, tmp_path)
    assert other.handle_line(f"/load {tmp_path / 'chat.json'}") == OK
    assert other.session.turns[0].user_text == text  # the same text, read back


def test_export_writes_what_came_from_a_session_file_or_the_model_escaped(loaded, tmp_path, home):
    # /export wrote answers, questions, the system message and file names raw: `cat talk.md` in a
    # terminal ran the escapes of a loaded session file (or of a model's answer)
    picture = tmp_path / f"cat{HOSTILE}.png"
    Image.fromarray(textured_rgb(448, 448, seed=3)).save(picture)
    app, _ = make_app(loaded, tmp_path)
    app.attach([app.describe(picture)])
    app.handle_line(f"/system Be brief.\n{HOSTILE}")
    app.handle_line(f"What is this?\n\t{HOSTILE}")
    app.handle_line(f"/save {tmp_path / 'hostile.json'}")
    data = json.loads((tmp_path / "hostile.json").read_text())
    data["model"] = f"/models/{HOSTILE}"
    answer = data["messages"][-1]
    answer["text"], answer["token_ids"] = f"It is a cat.\n{HOSTILE}\x9b31m", None
    (tmp_path / "hostile.json").write_text(json.dumps(data))

    other, out = make_app(loaded, tmp_path)
    assert other.handle_line(f"/load {tmp_path / 'hostile.json'}") == OK, output(out)
    assert other.handle_line(f"/export {tmp_path / 'talk.md'}") == OK, output(out)
    md = (tmp_path / "talk.md").read_text()
    assert not {"\x1b", "\x07", "\x9b", "\u202e"} & set(md)
    shown = "\\e]0;pwned\\x07\\e[2J\\u202eevil"
    assert f"Be brief.\n{shown}" in md and f"What is this?\n\t{shown}" in md  # lines and tabs kept
    assert "It is a cat.\n]0;pwned[2J\\u202eevil31m" in md  # an answer as it streams: controls dropped
    linked = shown.replace("\\", "\\\\")  # a link's text and target escape \\ [ ] < > (markdown_link)
    assert f"![cat{linked.replace(']', chr(92) + ']').replace('[', chr(92) + '[')}.png](<{tmp_path}/cat{linked}.png>)" in md


def test_input_that_is_not_utf8_is_refused_and_the_conversation_goes_on(loaded, tmp_path, home):
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    line = b"caf\xe9 ?".decode("utf-8", errors="surrogateescape")  # as the terminal decodes it
    output(out)
    assert app.handle_line(line) == ERROR
    assert output(out).strip() == "error: the input is not UTF-8 text (byte 0xe9); check the terminal's encoding"
    assert app.handle_line("Still here.") == OK and len(app.session.turns) == 2


def test_relative_media_paths_are_looked_up_in_search_dirs_first(loaded, tmp_path, home):
    scripts = tmp_path / "scripts"
    (scripts / "pics").mkdir(parents=True)
    Image.fromarray(textured_rgb(448, 448, seed=4)).save(scripts / "pics" / "a.png")
    (tmp_path / "pics").mkdir()
    Image.fromarray(textured_rgb(900, 450, seed=5)).save(tmp_path / "pics" / "b.png")
    app, out = make_app(loaded, tmp_path)
    app.search_dirs = (scripts,)
    assert app.handle_line("/image pics/a.png") == OK  # beside the script
    assert app.handle_line("/image pics/b.png") == OK  # not there: the working folder
    assert [m.path for m in app.pending] == [scripts / "pics" / "a.png", tmp_path / "pics" / "b.png"]
    app.pending.clear()
    output(out)
    app.handle_line("Compare ./pics/a.png with ./pics/b.png please.")
    assert [m.path.name for m in app.session.turns[0].media] == ["a.png", "b.png"]
    assert "does not exist" not in output(out)  # a.png was attached and also said to be missing (not in the working folder)
    app.handle_line("And ./pics/c.png?")
    assert f"warning: {tmp_path / 'pics' / 'c.png'} does not exist, so it was not attached; check the path" in output(out)


def test_a_picture_whose_file_name_is_not_utf8_is_saved_loaded_and_exported(loaded, tmp_path):
    # such a name (a Latin-1 "café.png", attached with --image) made /save and /export end the app
    # with UnicodeEncodeError; its bytes now survive the round trip
    name = os.fsdecode(b"caf\xe9.png")
    Image.fromarray(textured_rgb(64, 48, seed=4)).save(tmp_path / name, format="PNG")
    app, out = make_app(loaded, tmp_path, **{"media.max_tiles": 1})
    app.attach([app.session.describe_image(tmp_path / name, 1)])  # as setup.py does for --image
    assert app.handle_line("What is this?") == OK
    assert app.handle_line(f"/save {tmp_path / 's.json'}") == OK
    assert app.handle_line(f"/export {tmp_path / 's.md'}") == OK
    assert b"caf\\udce9.png" in (tmp_path / "s.json").read_bytes()  # JSON's escape for the lone byte
    assert b"caf\xe9.png" in (tmp_path / "s.md").read_bytes()  # the link names the file's own bytes
    other, out2 = make_app(loaded, tmp_path)
    assert other.handle_line(f"/load {tmp_path / 's.json'}") == OK, output(out2)
    (media,) = other.session.turns[0].media
    assert media.path == tmp_path / name
    assert other.handle_line("And now?") == OK
    # only the bytes of a file name come back as lone surrogates; others still damage the file
    data = (tmp_path / "s.json").read_text().replace("\\udce9", "\\ud800")
    (tmp_path / "bad.json").write_text(data)
    assert other.handle_line(f"/load {tmp_path / 'bad.json'}") == ERROR
    assert "lone surrogate" in output(out2)


def test_the_hints_quote_a_path_so_that_typed_back_they_work(loaded, tmp_path, home):
    folder = tmp_path / "my chats (old)"
    folder.mkdir()
    first, _ = make_app(loaded, tmp_path)
    first.handle_line("The first conversation.")
    assert first.handle_line(f"/save '{folder}/it'\\''s $1.json'") == OK
    assert first.handle_line(f"/export '{folder}/it'\\''s $1.md'") == OK
    second, out = make_app(loaded, tmp_path)
    second.handle_line("Another conversation.")
    output(out)
    for command in ("/save", "/export"):
        suffix = ".json" if command == "/save" else ".md"
        assert second.handle_line(f"{command} '{folder}/it'\\''s $1{suffix}'") == ERROR
        hint = re.search(rf"; ({command} .*) replaces it", output(out)).group(1)
        assert hint == f"{command} '{folder}/it'\\''s $1{suffix}' --force"
        assert second.handle_line(hint) == OK  # typed back, it does what it says
        assert "Another conversation." in (folder / f"it's $1{suffix}").read_text()
        assert second.handle_line(f"{command} '{folder}'") == ERROR  # a folder: an example name in it
        example = re.search(rf"e\.g\. ({command} .*)", output(out)).group(1)
        assert example == f"{command} '{folder}/chat{'.json' if command == '/save' else '.md'}'"
        assert second.handle_line(example) == OK and (folder / f"chat{suffix}").is_file()
    assert second.handle_line(f"/save '{default_sessions_dir()}/our talk.json'") == OK
    output(out)
    assert second.handle_line("/load") == OK  # the names the list shows are typed back after /load
    name = next(line for line in output(out).splitlines() if "our talk" in line).strip().split("  ")[0]
    assert name == "'our talk'" and second.handle_line(f"/load {name}") == OK


def test_export_never_replaces_a_file_it_did_not_write_for_this_conversation(loaded, tmp_path, home):
    # /export used to overwrite any file silently (a README.md, another conversation's export)
    notes = tmp_path / "notes.md"
    notes.write_text("my own notes")
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    output(out)
    assert app.handle_line("/export notes.md") == ERROR  # a script: refused, with what to do
    assert output(out).strip() == f"error: {notes} already exists; /export {notes} --force replaces it, or give another name"
    assert notes.read_text() == "my own notes"

    asked = []
    app.confirm = lambda question: asked.append(question) or False  # the REPL asks; "no" keeps the file
    assert app.handle_line("/export notes.md") == OK
    assert asked == [f"{notes} already exists; replace it? [y/N] "] and "not exported" in output(out)
    assert notes.read_text() == "my own notes"

    app.confirm = None
    assert app.handle_line("/export talk.md") == OK
    app.handle_line("More.")
    assert app.handle_line("/export talk.md") == OK  # its own export, grown: replaced without asking
    assert (tmp_path / "talk.md").read_text().count("## User") == 2
    app.handle_line("/clear")
    app.handle_line("Another conversation.")
    assert app.handle_line("/export talk.md") == ERROR  # a different conversation's export is kept
    assert (tmp_path / "talk.md").read_text().count("## User") == 2
    assert app.handle_line("/export notes.md --force") == OK
    assert "Another conversation." in notes.read_text()
    output(out)
    assert app.handle_line(f"/export {tmp_path}") == ERROR  # worded as /save words it
    assert output(out).strip() == f"error: {tmp_path} is a folder; give a file name, e.g. /export {tmp_path / 'chat.md'}"


def test_save_never_silently_replaces_a_conversation_with_the_same_texts_but_other_pictures(loaded, tmp_path, home):
    """A file counted as an earlier state of this conversation when its messages' texts matched,
    their pictures and videos unread: another conversation that asked the same question of a
    picture (the demo model's answers are few: "A triangle.") was replaced silently."""
    app, out = make_app(loaded, tmp_path)
    app.handle_line("What shape is green?")
    assert app.handle_line("/save mine.json") == OK
    theirs = json.loads((tmp_path / "mine.json").read_text())
    picture = {"kind": "image", "path": str(tmp_path / "scene.png"), "bytes": 10, "sha256": "a" * 64, "tiles": 1,
               "max_tiles": 1, "size": [448, 448]}  # fmt: skip
    theirs["messages"][0]["media"] = [picture]  # the same texts, asked of a picture
    (tmp_path / "theirs.json").write_text(json.dumps(theirs))
    original = (tmp_path / "theirs.json").read_text()
    output(out)
    assert app.handle_line("/save theirs.json") == ERROR
    assert "already holds another conversation (1 turn)" in output(out)
    assert (tmp_path / "theirs.json").read_text() == original
    (tmp_path / "ours.json").write_text((tmp_path / "mine.json").read_text())
    assert app.handle_line("/save ours.json") == OK  # an earlier state of this very conversation, as before


def test_save_knows_its_earlier_file_after_the_folder_with_its_pictures_moved(loaded, tmp_path, home):
    """/save compared each message's media by path too: a conversation loaded from a folder moved
    with its pictures (found again beside the file) names them at their new paths, so the file it
    was loaded from, not rewritten since, counted as "another conversation" (a y/N, a script's
    error). What the model saw is the file's sha256 and its tiles, wherever it lies."""
    folder = tmp_path / "trip"
    folder.mkdir()
    Image.fromarray(textured_rgb(448, 448, seed=41)).save(folder / "scene.png")
    app, out = make_app(loaded, folder)
    for line in ("/image scene.png", "What is this?", "/save chat.json"):
        assert app.handle_line(line) == OK, line
    folder.rename(tmp_path / "moved")
    other, out2 = make_app(loaded, tmp_path / "moved")
    assert other.handle_line("/load chat.json") == OK
    assert other.session.turns[0].media[0].path == tmp_path / "moved" / "scene.png"
    assert other.handle_line("/save copy.json") == OK  # this conversation's file is now copy.json
    output(out2)
    assert other.handle_line("/save chat.json") == OK, output(out2)  # an earlier state of this very conversation

    data = json.loads((tmp_path / "moved" / "chat.json").read_text())
    data["messages"][0]["media"][0]["tiles"] = 3  # the same picture, cut into other tiles: the model saw other tokens
    (tmp_path / "moved" / "theirs.json").write_text(json.dumps(data))
    output(out2)
    assert other.handle_line("/save theirs.json") == ERROR
    assert "already holds another conversation (1 turn)" in output(out2)


def test_a_conversation_replaced_is_not_kept_alive_by_the_files_it_was_saved_and_exported_to(loaded, tmp_path, home):
    """/save and /export remembered the conversation by its first turn, held strongly: after /clear
    or /load, the old conversation (its pictures' pixels and features) stayed in memory for good."""
    app, _ = make_app(loaded, tmp_path)
    for command in ("/save first.json", "/export first.md", "/load first.json", "/clear"):
        app.handle_line("Hello.")
        held = [weakref.ref(turn) for turn in app.session.turns]
        assert app.handle_line(command) == OK
        if command != "/clear":
            app.session.clear()  # no turn of this conversation is held by the session now
        gc.collect()
        assert [ref() for ref in held] == [None], command
    app.handle_line("A new conversation.")
    app.confirm = None
    assert app.handle_line("/save first.json") == ERROR  # another conversation's file, as before
    assert app.handle_line("/export first.md") == ERROR


def test_save_and_export_onto_a_pipe_say_it_at_once(loaded, tmp_path, home):
    """A FIFO (or /dev/null) at the name was called a file that is not a session, with --force
    offered (or y/N asked in the REPL) for a write that then refused to replace it."""
    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)
    os.mkfifo(tmp_path / "pipe.md")
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    output(out)
    for command, name in (("/save pipe.json", "pipe.json"), ("/export pipe.md", "pipe.md")):
        assert app.handle_line(command) == ERROR
        assert output(out).strip() == f"error: {tmp_path / name} is not a regular file (a device or a pipe?); give the name of a file"
    app.confirm = lambda question: pytest.fail(f"asked {question!r}")
    assert app.handle_line("/save pipe.json") == ERROR and "not a regular file" in output(out)
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and len(app.session.turns) == 1


def test_load_asks_before_it_replaces_a_conversation_that_is_not_saved(loaded, tmp_path, home):
    # /load used to drop the conversation on screen without a word, saved or not
    app, out = make_app(loaded, tmp_path)
    app.handle_line("First.")
    app.handle_line("/save kept.json")
    asked = []
    app.confirm = lambda question: asked.append(question) or False
    assert app.handle_line("/load kept") == OK and asked == []  # nothing unsaved: no question
    app.handle_line("Second.")
    output(out)
    assert app.handle_line("/load kept") == OK
    assert asked == ["the conversation so far (2 turns) is not saved; load kept.json anyway? [y/N] "]
    assert "not loaded" in output(out) and [t.user_text for t in app.session.turns] == ["First.", "Second."]
    app.confirm = lambda question: asked.append(question) or True
    assert app.handle_line("/load kept") == OK and len(asked) == 2
    assert [t.user_text for t in app.session.turns] == ["First."]
    app.confirm = None  # a script loads as it is told
    app.handle_line("Third.")
    assert app.handle_line("/load kept") == OK and [t.user_text for t in app.session.turns] == ["First."]


def test_without_a_home_folder_load_still_finds_a_path(loaded, tmp_path, monkeypatch):
    """/load NAME looked in the sessions folder first thing, so with no home folder (HOME unset, a
    uid with no account entry) even a session in the working folder could not be loaded."""
    import pwd

    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    assert app.handle_line(f"/save {tmp_path / 'here.json'}") == OK
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    assert app.handle_line("/load here") == OK
    output(out)
    assert app.handle_line("/load nothing") == ERROR
    assert output(out) == "error: there is no session nothing here; check the path\n"


def test_export_keeps_its_structure_whatever_the_answers_and_file_names_hold(loaded, tmp_path, home):
    """An answer cut short inside a code block (max_new_tokens, Ctrl-C) left its fence open, so
    every later heading of the export became code; a `]` in a picture's name or a `>` in its
    folder's ended the link early and the rest of the name became Markdown; an answer's remote
    image or raw HTML made a viewer of the export fetch a URL the model chose."""
    folder = tmp_path / "a> b"
    folder.mkdir()
    picture = folder / "x](y) [z.png"
    Image.fromarray(textured_rgb(448, 448, seed=3)).save(picture)
    app, _ = make_app(loaded, tmp_path)
    app.attach([app.describe(picture)])
    app.handle_line("Write code.")
    app.handle_line("And more.")
    app.handle_line(f"/save {tmp_path / 'cut.json'}")
    data = json.loads((tmp_path / "cut.json").read_text())
    answer = [m for m in data["messages"] if m["role"] == "assistant"][0]
    answer["text"], answer["token_ids"] = "Here:\n````python\nprint(1)\n```\nstill code", None
    answer["finish_reason"] = "length"
    last = [m for m in data["messages"] if m["role"] == "assistant"][-1]
    last["token_ids"] = None
    last["text"] = ("See ![chart](https://evil.example/p.png?q=secret) <img src=https://evil.example/x>\n"
                    "Use `<b>` or\n```html\n<img src=a.png> ![x](y)\n```")  # fmt: skip
    (tmp_path / "cut.json").write_text(json.dumps(data))
    other, out = make_app(loaded, tmp_path)
    assert other.handle_line(f"/load {tmp_path / 'cut.json'}") == OK, output(out)
    assert other.handle_line(f"/export {tmp_path / 'cut.md'}") == OK, output(out)
    md = (tmp_path / "cut.md").read_text()
    assert f"![x\\](y) \\[z.png](<{tmp_path}/a\\> b/x](y) [z.png>)" in md
    # the open fence closed before the mark that says the answer was cut there, and the next turn
    assert "```\nstill code\n````\n\n*(answer cut short: it reached the length limit)*\n\n## User\n\nAnd more." in md
    # a viewer of the export fetches nothing from the network; code is left as the model wrote it
    assert "See &#33;[chart](https://evil.example/p.png?q=secret) &lt;img src=https://evil.example/x>" in md
    assert "Use `<b>` or\n```html\n<img src=a.png> ![x](y)\n```" in md


def test_a_message_line_reading_as_an_export_heading_fakes_no_turn(loaded, tmp_path, home):
    # "## Assistant" typed in a message (or written by the model) read as a turn of its own
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line('"""\nMy question.\n## Assistant\nThe answer is 42.\n"""') == OK, output(out)
    assert app.handle_line(f"/export {tmp_path / 'chat.md'}") == OK, output(out)
    md = (tmp_path / "chat.md").read_text()
    turns = [line for line in md.splitlines() if line in ("## User", "## Assistant")]
    assert turns == ["## User", "## Assistant"], md
    assert "My question.\n\\## Assistant\nThe answer is 42." in md



CUT_MARKS = {  # what an export writes after an answer that did not end by itself
    "length": "*(answer cut short: it reached the length limit)*",
    "cancelled": "*(answer cut short: cancelled by the user)*",
    "error": "*(answer cut short: it broke off with an error)*",
}


def _assistant_parts(md: str) -> list[str]:
    """Each answer of an export as written, up to the next turn."""
    return [part.split("\n## User\n")[0].strip("\n") for part in md.split("\n## Assistant\n")[1:]]


def test_an_export_marks_each_answer_that_was_cut_short_also_after_save_and_load(loaded, tmp_path, home):
    """An answer cut by max_new_tokens, Ctrl-C or a broken server stream was exported as if it were
    whole (a cancelled one ended with "[cancelled]", inside its code block when it was cut there): a
    reader of the export took the part for the answer. Each now ends with a line saying so; a whole
    answer is written as before."""
    app, out = make_app(loaded, tmp_path, max_new_tokens=2)
    assert app.handle_line("Hello.") == OK and app.session.turns[0].finish_reason == "length", output(out)
    assert app.handle_line(f"/export {tmp_path / 'now.md'}") == OK, output(out)
    (part,) = _assistant_parts((tmp_path / "now.md").read_text())
    assert part == export_block(sanitize(app.session.turns[0].answer_text)).strip("\n") + "\n\n" + CUT_MARKS["length"]

    for line in ("Go on.", "And more.", "Last one."):
        assert app.handle_line(line) == OK, output(out)
    assert app.handle_line(f"/save {tmp_path / 'cut.json'}") == OK, output(out)
    data = json.loads((tmp_path / "cut.json").read_text())
    answers = [m for m in data["messages"] if m["role"] == "assistant"]
    reasons = ["length", "stop", "cancelled", "error"]
    texts = ["A whole [cancelled]", "Whole.", "Partial", "```python\nprint(1) [cancelled]"]
    for answer, reason, text in zip(answers, reasons, texts):
        answer["text"], answer["token_ids"], answer["finish_reason"] = text, None, reason
    (tmp_path / "cut.json").write_text(json.dumps(data))

    other, out = make_app(loaded, tmp_path)
    assert other.handle_line(f"/load {tmp_path / 'cut.json'}") == OK, output(out)
    assert [t.finish_reason for t in other.session.turns] == reasons
    assert other.handle_line(f"/save {tmp_path / 'again.json'}") == OK, output(out)  # the reasons survive the file
    again, out = make_app(loaded, tmp_path)
    assert again.handle_line(f"/load {tmp_path / 'again.json'}") == OK
    assert "[cancelled]” (cut short: it broke off with an error; /retry answers again, /undo removes it)\n" in output(out)  # /load's last turn says it too
    assert again.handle_line(f"/export {tmp_path / 'cut.md'}") == OK, output(out)
    assert _assistant_parts((tmp_path / "cut.md").read_text()) == [
        "A whole [cancelled]\n\n" + CUT_MARKS["length"],  # the model's own words are kept as written
        "Whole.",  # ended by itself: as before, no mark
        "Partial\n\n" + CUT_MARKS["cancelled"],  # the app's " [cancelled]" said once, after the text
        "```python\nprint(1) [cancelled]\n```\n\n" + CUT_MARKS["error"],  # after the code block, not in it
    ]


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs a file that cannot be read: Linux's /proc/self/mem")
def test_a_saved_picture_that_cannot_be_read_is_named_and_skip_missing_leaves_it_out(loaded, tmp_path, home):
    """A saved picture that is a regular file but cannot be read (chmod 000; here /proc/self/mem, which
    fails for root too) ended /load with "cannot use: Input/output error", naming no file, and
    --skip-missing could not load the session without it."""
    Image.fromarray(textured_rgb(448, 448, seed=33)).save(tmp_path / "seen.png")
    app, out = make_app(loaded, tmp_path)
    for line in ("/image seen.png", "What is this?", "/save chat.json"):
        assert app.handle_line(line) == OK
    data = json.loads((tmp_path / "chat.json").read_text())
    (media,) = data["messages"][0]["media"]
    media.update(path="/proc/self/mem", relative_path=None)
    del media["bytes"]  # so it is hashed, not refused for its size
    (tmp_path / "chat.json").write_text(json.dumps(data))
    output(out)
    assert app.handle_line("/load chat.json") == ERROR
    assert "cannot restore the session: /proc/self/mem cannot be read (" in output(out)
    assert app.handle_line("/load chat.json --skip-missing") == OK
    assert "left out 1 file that vanished or changed: mem (turn 1)" in output(out)
    assert [t.media for t in app.session.turns] == [[]]


def test_load_skip_missing_goes_on_without_a_picture_that_vanished(loaded, tmp_path, home):
    """/load refuses a session whose picture vanished and says how to load it anyway; with
    --skip-missing the conversation loads without it, says in one line what was left out, and
    every command goes on. The file that still names the picture is not replaced silently."""
    for name, seed in (("first.png", 31), ("second.png", 32)):
        Image.fromarray(textured_rgb(448, 448, seed=seed)).save(tmp_path / name)
    app, out = make_app(loaded, tmp_path)
    for line in ("/image first.png", "What is this?", "/image second.png", "And this?"):
        assert app.handle_line(line) == OK
    assert app.handle_line("/save chat.json") == OK
    original = (tmp_path / "chat.json").read_text()
    (tmp_path / "first.png").unlink()

    other, out2 = make_app(loaded, tmp_path)
    other.handle_line("Kept.")
    output(out2)
    assert other.handle_line("/load chat.json") == ERROR
    refusal = output(out2)
    assert "first.png has vanished; put the files back, add --skip-missing to /load" in refusal
    assert [t.user_text for t in other.session.turns] == ["Kept."]
    assert other.handle_line("/load --skip-missing") == ERROR  # no NAME: said, not a list that drops the flag
    assert "/load NAME --skip-missing" in output(out2) and [t.user_text for t in other.session.turns] == ["Kept."]

    assert other.handle_line("/load chat.json --skip-missing") == OK
    shown = output(out2)
    assert "loaded 2 turns" in shown
    assert "warning: left out 1 file that vanished or changed: first.png (turn 1)\n" in shown
    turns = other.session.turns
    assert [t.user_text for t in turns] == ["[image first.png was not found]\nWhat is this?", "And this?"]
    assert [[m.path.name for m in t.media] for t in turns] == [[], ["second.png"]]
    for line in ("Go on.", "/undo", "/retry", "/export chat.md"):
        assert other.handle_line(line) == OK, line
    assert "[image first.png was not found]" in (tmp_path / "chat.md").read_text()

    assert other.handle_line("/save chat.json") == ERROR  # it no longer is the file's conversation
    assert "already holds another conversation" in output(out2)
    assert (tmp_path / "chat.json").read_text() == original
    assert other.handle_line("/save") == OK  # a new file in the sessions folder
    (saved,) = default_sessions_dir().glob("session-*.json")
    data = json.loads(saved.read_text())
    second = os.path.relpath(tmp_path / "second.png", saved.parent)
    assert [[m["relative_path"] for m in msg["media"]] for msg in data["messages"][::2]] == [[], [second]]
    assert other.handle_line(f"/load {saved}") == OK and "left out" not in output(out2)


def test_load_skip_missing_names_the_first_files_left_out_and_counts_the_rest(loaded, tmp_path, home):
    """The warning after /load --skip-missing named every file left out: 240 pictures moved away
    made one line of 5,000 characters (without the flag the error names 3 and counts the rest)."""
    picture = {"kind": "image", "tiles": 1, "max_tiles": 1, "sha256": ""}
    messages = []
    for n in range(1, 16):
        messages += [{"role": "user", "text": f"Question {n}?", "media": [{**picture, "path": f"/nowhere/p{n}.png"}]},
                     {"role": "assistant", "text": "A."}]  # fmt: skip
    (tmp_path / "moved.json").write_text(json.dumps({"format": "internvl-chat-session", "version": 1, "messages": messages}))
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("/load moved.json --skip-missing") == OK
    warning = next(line for line in output(out).splitlines() if line.startswith("warning: left out"))
    listed = ", ".join(f"p{n}.png (turn {n})" for n in range(1, 11))
    assert warning == f"warning: left out 15 files that vanished or changed: {listed} and 5 more"
    assert len(app.session.turns) == 15


def test_saving_or_exporting_an_empty_conversation_warns_only_once_it_is_written(loaded, tmp_path, home):
    """An empty conversation saved where no file can be written gets the one error line, not first
    "saving it anyway" (the save that then fails never went ahead)."""
    app, out = make_app(loaded, tmp_path)
    (tmp_path / "a-file").write_text("x")
    assert app.handle_line(f"/save {tmp_path / 'a-file' / 'chat.json'}") == ERROR
    text = output(out)
    assert "anyway" not in text and text.count("error:") == 1
    assert app.handle_line(f"/save {tmp_path / 'empty.json'}") == OK
    assert "the conversation is empty; saved it anyway" in output(out)
    assert app.handle_line(f"/export {tmp_path / 'a-file' / 'chat.md'}") == ERROR  # /export alike
    text = output(out)
    assert "anyway" not in text and text.count("error:") == 1


GONE = "the working folder no longer exists (it was deleted or moved)"


@pytest.fixture
def folder_gone(tmp_path, monkeypatch) -> Path:
    """The process's working folder, deleted (os.getcwd() raises); the test's own is restored after."""
    folder = tmp_path / "gone"
    folder.mkdir()
    monkeypatch.chdir(folder)
    folder.rmdir()
    return folder


def test_relative_paths_in_a_deleted_working_folder_say_so_and_the_conversation_goes_on(loaded, tmp_path, home, folder_gone):
    """`/save chat.json` said only "No such file or directory"; each command that takes a relative
    path now names the deleted folder and what to do, and nothing is lost."""
    Image.fromarray(textured_rgb(64, 64, seed=3)).save(tmp_path / "pic.png")
    app, out = make_app(loaded, None)  # the REPL's App: relative paths are the process's
    app.handle_line("Hello.")
    output(out)
    for command in ("/save chat.json", "/save ./~chat.json", "/export chat.md", "/load chat", "/image pic.png",
                    "/image ./*.png", "/video clip.mp4"):  # fmt: skip
        assert app.handle_line(command) == ERROR, command
        said = output(out)
        assert said.startswith(f"error: {GONE}, so the file ") and said.rstrip().endswith(
            "give a full path (one starting with / or ~), or cd to an existing folder and start internvl-chat there"), said
    assert app.handle_line("What is in ./pic.png?") == OK
    assert f"warning: pic.png was not found: {GONE}, so it was not attached; give a full path" in output(out)
    assert [t.user_text for t in app.session.turns] == ["Hello.", "What is in ./pic.png?"]
    assert app.handle_line(f"/save {tmp_path / 'chat.json'}") == OK  # a full path still works
    (default_sessions_dir() / "kept.json").parent.mkdir(parents=True, exist_ok=True)
    (default_sessions_dir() / "kept.json").write_text((tmp_path / "chat.json").read_text())
    assert app.handle_line("/load kept") == OK  # a name in the sessions folder still loads
    assert len(app.session.turns) == 2


def test_tab_completion_in_a_deleted_working_folder_says_why_it_offers_nothing(home, folder_gone):
    from internvl_chat.ui.repl import complete_path, complete_session

    for completions in (complete_path("pi", "media"), complete_session("ch")):
        (hint,) = list(completions)
        assert hint.display_text == f"{GONE}: type a full path" and hint.text in ("pi", "ch")
    home.mkdir()
    assert [c.text for c in complete_path(str(home.parent / "ho"), "file")] == [f"{home}/"]  # a full path completes


def _in_thread(run, release: Path, timeout: float = 60) -> list:
    """`run()`'s result, from a thread: a regression that blocks on a FIFO fails the test instead
    of hanging it (the stuck open is released by opening the FIFO's other end, then it fails)."""
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(run()), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        os.close(os.open(release, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout)
        pytest.fail("it blocked on the FIFO")
    return outcome


@pytest.mark.parametrize("swapped", ["session", "picture"])
def test_a_fifo_swapped_in_mid_load_is_refused_without_blocking(loaded, tmp_path, home, monkeypatch, swapped):
    """The session file, or a picture it names, replaced by a FIFO after /load looked at it and
    before it is read: the picture was hashed with a blocking open, which waited for a writer forever."""
    from internvl_chat.chat import saved_media
    from internvl_chat.ui import session_commands

    Image.fromarray(textured_rgb(64, 64, seed=4)).save(tmp_path / "pic.png")
    app, out = make_app(loaded, tmp_path)
    app.handle_line(f"/image {tmp_path / 'pic.png'}")
    app.handle_line("Hello.")
    app.handle_line(f"/save {tmp_path / 'chat.json'}")
    before = list(app.session.ids)
    output(out)
    target = tmp_path / ("chat.json" if swapped == "session" else "pic.png")

    def swap_after(check):
        def checked(*args):
            result = check(*args)
            if not stat.S_ISFIFO(os.lstat(target).st_mode):
                target.unlink()
                os.mkfifo(target)
            return result
        return checked

    if swapped == "session":  # after /load found the file
        monkeypatch.setattr(session_commands.SessionFileCommands, "_find_session",
                            swap_after(session_commands.SessionFileCommands._find_session))  # fmt: skip
    else:  # after its size matched the saved one
        monkeypatch.setattr(saved_media, "_size", swap_after(saved_media._size))
    (status,) = _in_thread(lambda: app.handle_line(f"/load {tmp_path / 'chat.json'}"), target)
    assert status == ERROR and "not a regular file" in output(out)
    assert app.session.ids == before  # the conversation is as it was


def test_load_alone_marks_the_files_it_would_refuse_with_why(loaded, tmp_path, home):
    """The list counted the turns of any file with messages: a version-2 file, or one ending with a
    question and no answer, was offered with a turn count and then refused by /load NAME."""
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    folder = default_sessions_dir()
    assert app.handle_line(f"/save {folder / 'good.json'}") == OK
    good = json.loads((folder / "good.json").read_text())
    (folder / "newer.json").write_text(json.dumps({**good, "version": 2}))
    (folder / "open.json").write_text(json.dumps({**good, "messages": good["messages"][:1]}))
    (folder / "notes.json").write_text('{"title": "not a session"}')
    (folder / "cut.json").write_text('{"format": "internvl-chat-se')
    output(out)
    assert app.handle_line("/load") == OK
    listing = output(out).splitlines()[1:-1]
    rows = {line.split()[0]: line for line in listing}
    assert re.search(r"  1 turn  +[-0-9: ]+$", rows["good"])
    assert rows["newer"].endswith("(format version 2, this build reads 1)") and "turn" not in rows["newer"]
    assert rows["open"].endswith("(damaged)") and rows["notes"].endswith("(not a session)")
    assert rows["cut"].endswith("(not readable)")
    assert all(re.search(r"  cannot load  [-0-9: ]+  \(", rows[name]) for name in ("newer", "open", "notes", "cut"))
    for name in ("newer", "open"):
        assert app.handle_line(f"/load {name}") == ERROR  # what the list said


def test_load_of_a_name_not_saved_suggests_the_closest_saved_ones(loaded, tmp_path, home):
    """`/load chat` beside chat1.json and chat-2.json only said there is no session chat."""
    app, out = make_app(loaded, tmp_path)
    folder = default_sessions_dir()
    folder.mkdir(parents=True)
    for name in ("chat1", "chat-2", "holiday", "cha\x1bts"):
        (folder / f"{name}.json").write_text("{}")
    assert app.handle_line("/load chat") == ERROR
    said = output(out)
    assert said.startswith("error: there is no session chat here or in ")
    # closest first, each as it is typed back (quoted, escaped as the /load list shows it)
    assert said.endswith("; did you mean chat1, chat-2 or 'cha\\ets'? /load alone lists the saved ones\n")
    assert "\x1b" not in said
    assert app.handle_line("/load hollday.json") == ERROR
    assert "; did you mean holiday? /load alone" in output(out)
    assert app.handle_line("/load zebra") == ERROR
    assert output(out).endswith(f"in {folder}; /load alone lists the saved ones\n")  # nothing is close
    assert app.handle_line(f"/load {tmp_path / 'chat'}") == ERROR  # a path: not a name in the folder
    assert "did you mean" not in output(out)


def test_loads_list_lines_up_names_of_wide_characters(loaded, tmp_path, home):
    # names were padded to the same number of characters: a CJK name, two cells each, pushed its
    # row's turn count and date right (past the edge of a narrow terminal)
    from rich.cells import cell_len

    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    for name in ("会话一二三四", "twelve-cells", "ab"):
        assert app.handle_line(f"/save {default_sessions_dir() / name}.json") == OK
    output(out)
    assert app.handle_line("/load") == OK
    rows = [line for line in output(out).splitlines() if " turn " in line]
    assert len(rows) == 3 and len({cell_len(row[: row.index(" 1 turn ")]) for row in rows}) == 1, rows


def test_save_says_that_attachments_not_sent_yet_are_not_in_the_session(loaded, tmp_path, home):
    # `/image`, `/save`, quit: the session had no picture, and /save had not said so
    app, out = make_app(loaded, tmp_path)
    app.handle_line("Hello.")
    for name in ("a.png", "b.png"):
        Image.fromarray(textured_rgb(64, 64, seed=3)).save(tmp_path / name)
    app.handle_line("/image a.png")
    output(out)
    assert app.handle_line("/save s.json") == OK
    assert output(out).endswith("s.json\nwarning: a.png, attached for the next message, is not in the saved "
                                "session; send a message with it, then /save again\n")  # fmt: skip
    app.handle_line("/image b.png")
    assert app.handle_line("/save s.json") == OK
    assert "a.png, b.png, attached for the next message, are not in the saved session; send a message with them" in output(out)
    app.handle_line("What are these?")
    assert app.handle_line("/save s.json") == OK
    shown = output(out)
    assert "saved 2 turns to " in shown and "warning" not in shown


def test_load_of_a_conversation_over_the_context_is_refused_before_asking_to_replace_this_one(loaded, tiny_original,
                                                                                                tmp_path, home):  # fmt: skip
    """A session saved near the edge of a larger context, loaded where it does not fit: the REPL
    asked "the conversation so far … is not saved; load it anyway? [y/N]" and only after a "y" found
    it did not fit (the check before the question was a bound below its size). It is refused first."""
    from internvl_chat.engine.loader import load_model

    app, _ = make_app(loaded, tmp_path)
    for _ in range(12):
        assert app.handle_line("Hi.") == OK
    assert app.handle_line(f"/save {tmp_path / 'long.json'}") == OK
    need = app.session.context_used
    smaller = load_model(tiny_original, device="cpu", dtype="float32", max_context=need - 1, compile="off")
    other, out = make_app(smaller, tmp_path)
    assert other.handle_line("Unsaved.") == OK
    held = list(other.session.ids)
    asked = []
    other.confirm = lambda question: asked.append(question) or True
    output(out)
    assert other.handle_line(f"/load {tmp_path / 'long.json'}") == ERROR
    assert asked == []
    assert f"needs {need:,} tokens, over the {need - 1:,}-token context" in output(out)
    assert other.session.ids == held


def _full_session_and_its_models(loaded, tiny_original, tmp_path):
    """Saves full.json, six turns of 2-token answers; returns the tiny model whose context that
    session fills exactly and one with 40 tokens to spare."""
    from internvl_chat.engine.loader import load_model

    app, _ = make_app(loaded, tmp_path, max_new_tokens=2)
    for _ in range(6):
        assert app.handle_line("Hi.") == OK
    assert app.handle_line(f"/save {tmp_path / 'full.json'}") == OK
    need = app.session.context_used
    exact = load_model(tiny_original, device="cpu", dtype="float32", max_context=need, compile="off")
    roomy = load_model(tiny_original, device="cpu", dtype="float32", max_context=need + 40, compile="off")
    return exact, roomy


def test_a_session_that_fills_the_context_is_not_told_to_shrink_max_new_tokens(loaded, tiny_original, tmp_path, home):
    """Saved near the edge and loaded where it fills the context exactly, no max_new_tokens (1 at
    least) leaves room for another question: /load's and /context's warnings (and /system's) still said
    "or /set max_new_tokens N with a smaller N", a value the next question is refused with all the
    same. They name /undo and /clear; where a smaller answer does fit, they still name it."""
    exact, roomy = _full_session_and_its_models(loaded, tiny_original, tmp_path)
    other, out = make_app(exact, tmp_path)
    for line in ("/load full.json", "/context"):
        other.handle_line(line)
        said = output(out)
        assert "no room" in said or "over the" in said, (line, said)
        assert "/undo or /clear make room" in said and "smaller" not in said, (line, said)
    third, out = make_app(roomy, tmp_path)
    assert third.handle_line("/load full.json") == OK and third.handle_line("/set max_new_tokens 100") == OK
    output(out)
    third.handle_line("/context")
    assert "/undo or /clear make room, or /set max_new_tokens N with a smaller N" in output(out)


def test_set_max_new_tokens_at_the_context_edge_does_not_advise_a_smaller_one(loaded, tiny_original, tmp_path, home):
    """A conversation that fills the context: `/set max_new_tokens 1` warned "… or give a smaller
    max_new_tokens", though none is smaller than 1 and none leaves room (as /load's, /context's and
    /system's warnings no longer say). Where a smaller one does make room, it is still named."""
    exact, roomy = _full_session_and_its_models(loaded, tiny_original, tmp_path)
    other, out = make_app(exact, tmp_path)
    other.handle_line("/load full.json")
    output(out)
    other.handle_line("/set max_new_tokens 1")
    said = output(out)
    assert "no room" in said and "/undo or /clear" in said and "smaller" not in said, said
    third, out = make_app(roomy, tmp_path)
    assert third.handle_line("/load full.json") == OK
    output(out)
    third.handle_line("/set max_new_tokens 100")
    said = output(out)
    assert "no room" in said and "give a smaller max_new_tokens" in said, said


def test_a_loaded_session_without_turns_whose_system_message_fills_the_context_advises_a_shorter_one(loaded, tmp_path,
                                                                                                      home):  # fmt: skip
    """Saved before its first question, with a system message too long for this context: /load
    warned "/undo or /clear make room", with nothing to undo or clear. As /system's warning does, it
    names a shorter system message."""
    app, out = make_app(loaded, tmp_path)
    assert app.handle_line("/system " + "Be very brief. " * 400) == OK
    assert app.handle_line(f"/save {tmp_path / 'empty.json'}") == OK
    assert app.handle_line("/system Short.") == OK
    output(out)
    app.handle_line(f"/load {tmp_path / 'empty.json'}")
    said = output(out)
    assert "no room" in said and "/undo" not in said and "shorter one (/system) makes room" in said, said


def test_a_loaded_session_whose_max_new_tokens_fills_the_context_says_so(loaded, tmp_path, home):
    """A session saved with max_new_tokens as large as this context: /load restored it and warned
    that a shorter system message (or, with turns, /undo or /clear) makes room, which none does; the
    answer alone fills the context. It says so, as `/set max_new_tokens` does."""
    app, out = make_app(loaded, tmp_path)
    limit = app.session.max_context
    assert app.handle_line(f"/set max_new_tokens {limit}") == OK
    assert app.handle_line(f"/save {tmp_path / 'big.json'}") == OK
    other, out = make_app(loaded, tmp_path)
    other.handle_line(f"/load {tmp_path / 'big.json'}")
    said = output(out)
    assert "settings from the session: max_new_tokens" in said, said
    assert f"the answer alone could fill the {limit:,}-token context" in said and "makes room" not in said, said
