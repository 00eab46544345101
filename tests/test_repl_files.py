"""The REPL's own files: the history file is never followed through a symlink nor used when it is not
a regular file; /load completes saved session names; /save asks (y/N) before replacing another
conversation, in a real terminal."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

from prompt_toolkit.document import Document
from prompt_toolkit.history import InMemoryHistory

from internvl_chat.settings import Settings
from internvl_chat.ui.repl import ChatCompleter, PrivateFileHistory, complete_session, open_history
from test_repl_pty import PROMPT_READY, STATS, Repl


class Warnings:
    """Stands in for the App where open_history reports (only `warn` is used)."""

    def __init__(self):
        self.lines: list[str] = []

    def warn(self, text: str) -> None:
        self.lines.append(text)


def _settings(path: Path) -> Settings:
    settings = Settings()
    settings.set("ui.history_file", str(path))
    return settings


def test_a_symlinked_history_file_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "secret.txt"
    target.write_text("do not touch")
    target.chmod(0o644)
    link = tmp_path / "history"
    link.symlink_to(target)
    warnings = Warnings()
    history = open_history(_settings(link), warnings)
    assert isinstance(history, InMemoryHistory)
    assert warnings.lines == [f"the history file {link} is a symbolic link (it is never followed); make it a plain "
                              "file; the history is kept in memory only this time"]  # fmt: skip
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.read_text() == "do not touch"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "would-be-created")
    assert isinstance(open_history(_settings(dangling), warnings), InMemoryHistory)
    assert not (tmp_path / "would-be-created").exists()


def test_a_fifo_or_folder_as_history_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    warnings = Warnings()
    result = []
    opener = threading.Thread(target=lambda: result.append(open_history(_settings(fifo), warnings)), daemon=True)
    opener.start()
    opener.join(timeout=60)
    assert result and isinstance(result[0], InMemoryHistory)
    assert "is not a regular file" in warnings.lines[0]
    assert isinstance(open_history(_settings(tmp_path), warnings), InMemoryHistory)


def test_the_default_history_file_follows_xdg_state_home_as_sessions_do(tmp_path, monkeypatch):
    # it stayed under ~/.local/state whatever $XDG_STATE_HOME said, while /save's sessions moved
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    history = open_history(Settings(), Warnings())
    assert isinstance(history, PrivateFileHistory)
    history.store_string("hello")
    assert (tmp_path / "state" / "internvl-chat" / "history").read_text().endswith("+hello\n")
    assert not (tmp_path / "home").exists()
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")  # invalid by the XDG spec: the home default
    assert Settings().ui.history_path == tmp_path / "home" / ".local" / "state" / "internvl-chat" / "history"


def test_the_history_file_is_private_and_round_trips_entries(tmp_path):
    path = tmp_path / "state" / "history"
    path.parent.mkdir()
    path.write_text("\n# old\n+older entry\n")
    path.chmod(0o644)
    history = open_history(_settings(path), Warnings())
    assert isinstance(history, PrivateFileHistory)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    history.store_string("first line\nsecond line")
    history.store_string(b"caf\xe9".decode("utf-8", errors="surrogateescape"))  # typed in a latin-1 terminal
    again = open_history(_settings(path), Warnings())
    assert list(again.load_history_strings()) == ["caf\ufffd", "first line\nsecond line", "older entry"]


def test_the_history_files_new_folders_are_private_as_the_sessions_are(tmp_path, monkeypatch):
    # only the last folder was made 0700 (Path.mkdir's mode): ~/.local and ~/.local/state came out 0755
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    old = os.umask(0o022)
    try:
        assert isinstance(open_history(Settings(), Warnings()), PrivateFileHistory)
    finally:
        os.umask(old)
    made = [tmp_path / "home" / part for part in (".local", ".local/state", ".local/state/internvl-chat")]
    assert [oct(stat.S_IMODE(folder.stat().st_mode)) for folder in made] == [oct(0o700)] * 3


def test_load_completes_the_names_of_saved_sessions(tmp_path, monkeypatch):
    folder = tmp_path / "sessions"
    folder.mkdir()
    for n, name in enumerate(["talk-b", "talk-a", "other"]):
        (folder / f"{name}.json").write_text("{}")
        os.utime(folder / f"{name}.json", (1_000_000 + n, 1_000_000 + n))
    (folder / "notes.txt").write_text("")
    assert [c.text for c in complete_session("talk", cwd=tmp_path, folder=folder)] == ["talk-a", "talk-b"]
    home = tmp_path / "home"
    state = home / ".local" / "state" / "internvl-chat" / "sessions"
    state.mkdir(parents=True)
    (state / "mine.json").write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    complete = lambda text: [c.text for c in ChatCompleter(tmp_path).get_completions(Document(text), None)]  # noqa: E731
    assert complete("/load mi") == ["mine"]
    assert "sessions/" in complete("/save --force ")  # after a flag the path is completed again



def test_load_completes_paths_without_a_home_folder(tmp_path, monkeypatch):
    """HOME unset for a uid with no account entry: Tab after `/load ` looked for the sessions folder,
    and the NoHomeFolder it raised escaped the completer into prompt_toolkit's event loop."""
    import pwd

    (tmp_path / "kept.json").write_text("{}")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    complete = lambda text: [c.text for c in ChatCompleter(tmp_path).get_completions(Document(text), None)]  # noqa: E731
    assert complete("/load ke") == ["kept.json"]
    assert complete("/load ") == ["kept.json"]

def test_save_asks_before_replacing_another_conversation_in_the_terminal(tiny_original, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    other = {"format": "internvl-chat-session", "version": 1, "messages": [
        {"role": "user", "text": "Someone else's question.", "media": []},
        {"role": "assistant", "text": "Their answer.", "token_ids": [], "finish_reason": "stop"}]}  # fmt: skip
    (home / "theirs.json").write_text(json.dumps(other))
    repl = Repl(home, tiny_original, "--max-new-tokens", "4", "--no-history")
    repl.run("Hello.", STATS)
    repl.enter("/save theirs.json")
    repl.child.expect_exact("theirs.json holds another conversation (1 turn); replace it? [y/N] ")
    repl.child.send("n\r")
    repl.child.expect_exact("not saved")
    repl.child.expect_exact(PROMPT_READY)
    assert json.loads((home / "theirs.json").read_text()) == other
    repl.enter("/save theirs.json")
    repl.child.expect_exact("replace it? [y/N] ")
    repl.child.send("y\r")
    repl.child.expect_exact("saved 1 turn to")
    repl.child.expect_exact(PROMPT_READY)
    repl.enter("/exit")
    assert repl.close() == 0
    assert json.loads((home / "theirs.json").read_text())["messages"][0]["text"] == "Hello."


def test_a_history_file_over_the_read_limit_gives_only_whole_entries(tmp_path, monkeypatch):
    """Only the file's last bytes are read: the entry they began inside came back as its tail,
    which Up recalled and Enter sent cut short (its first line cut mid-character, too)."""
    from internvl_chat.ui import repl

    data = "\n# 1\n+rm -rf build/é and then\n+the second line\n\n# 2\n+ok\n\n# 3\n+fine\n".encode()
    monkeypatch.setattr(repl, "HISTORY_READ_LIMIT", len(data) - data.index(b"build"))  # begins at "build/"
    path = tmp_path / "history"
    path.write_bytes(data)
    assert list(open_history(_settings(path), Warnings()).load_history_strings()) == ["fine", "ok"]
    path.write_bytes(b"+" + b"x" * 200)  # no entry starts in the part read: nothing, no error
    assert list(open_history(_settings(path), Warnings()).load_history_strings()) == []
