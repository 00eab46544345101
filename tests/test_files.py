"""files.py: bounded reads that refuse FIFOs, devices and huge files; atomic writes; inert printing."""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from pathlib import Path

import pytest

from internvl_chat.errors import UsageError
from internvl_chat.files import (
    expand_home,
    read_bytes_file,
    read_stream,
    read_text_file,
    sniff_binary,
    undecodable_byte,
    visible,
    visible_lines,
    write_atomic,
)


def test_utf16_and_utf32_text_is_named_by_its_encoding(tmp_path):
    # Notepad's "Unicode" (UTF-16 with a byte-order mark) said "byte 0xff on line 1" for a config
    # or session file, and "binary data" (its NUL bytes) for a script or stdin
    for encoding, name in (("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32")):
        path = tmp_path / "config.toml"
        path.write_bytes("\ufeff[generation]\ntemperature = 0.5\n".encode(encoding))
        with pytest.raises(UsageError) as err:
            read_text_file(path, "config file")
        assert str(err.value) == f"config file {path} is {name} text, not UTF-8; save it as UTF-8 (iconv -f {name} -t UTF-8)"

def test_a_fifo_is_refused_at_once_instead_of_blocking(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    outcome = []
    # run in a thread so a regression (a blocking open) fails the test instead of hanging it
    reader = threading.Thread(target=lambda: outcome.append(_error_of(read_text_file, fifo, "session file")), daemon=True)
    reader.start()
    reader.join(timeout=60)
    if reader.is_alive():  # unblock the stuck open before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert outcome and "is not a regular file" in outcome[0]


def _error_of(fn, *args) -> str:
    try:
        fn(*args)
    except UsageError as e:
        return str(e)
    return "no error"


def test_devices_folders_missing_and_huge_files_are_refused(tmp_path):
    assert "is not a regular file" in _error_of(read_text_file, "/dev/zero", "script")
    assert "is a folder" in _error_of(read_text_file, tmp_path, "script")
    assert "does not exist" in _error_of(read_text_file, tmp_path / "none.txt", "script")
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(17 << 20)  # sparse: no disk used
    message = _error_of(read_text_file, huge, "session file")
    assert "17.0 MiB, over the 16 MiB limit" in message and "\n" not in message


def test_text_must_be_utf8_and_the_message_says_where(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"[ui]\nplain = true\nname = \"caf\xe9\"\n")
    assert "not UTF-8 text (byte 0xe9 on line 3)" in _error_of(read_text_file, path, "config file")
    path.write_bytes("\ufeffa = 1\n".encode())
    assert read_text_file(path, "config file") == "a = 1\n"  # a BOM is dropped


def test_read_stream_stops_at_the_limit(tmp_path):
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        with pytest.raises(UsageError, match="stdin holds more than 1 MiB"):
            read_stream(fd, "stdin", limit=1 << 20)
    finally:
        os.close(fd)
    r, w = os.pipe()
    os.write(w, b"hello")
    os.close(w)
    assert read_stream(r, "stdin") == b"hello"
    os.close(r)


def test_write_atomic_replaces_a_symlink_and_never_writes_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "out.md"
    link.symlink_to(victim)
    write_atomic(link, "new")
    assert victim.read_text() == "precious"
    assert not link.is_symlink() and link.read_text() == "new"
    assert read_bytes_file(link, "x") == b"new"


def test_write_atomic_never_replaces_a_fifo_or_a_device(tmp_path):
    """/export /dev/full as root replaced the device with a regular file; a FIFO shows it unprivileged."""
    fifo = tmp_path / "pipe.md"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file") as err:
        write_atomic(fifo, "new")
    assert err.value.filename == str(fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe.md"]  # no temp file left behind


def test_write_atomic_in_a_folder_it_cannot_write_names_the_users_path(tmp_path, monkeypatch):
    """/save into a read-only folder said 'cannot use /x/.chat.json.k2j1.tmp: Permission denied':
    the temp file's name, never typed by the user."""

    def refused(prefix, suffix, dir):
        name = os.path.join(dir, f"{prefix}k2j1{suffix}")
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as err:
        write_atomic(tmp_path / "chat.json", "new")
    assert err.value.filename == str(tmp_path / "chat.json") and err.value.strerror == "Permission denied"


def test_write_atomic_syncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    """The rename is durable only once the folder's entry is on disk; a folder that cannot be
    synced (some file systems) still leaves the file written."""
    synced: list[str] = []
    real = os.fsync

    def record(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    write_atomic(tmp_path / "chat.json", "{}")
    assert synced == ["file", "folder"]

    def folder_refuses(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        return real(fd)

    monkeypatch.setattr(os, "fsync", folder_refuses)
    write_atomic(tmp_path / "chat.json", "{1}")
    assert (tmp_path / "chat.json").read_text() == "{1}"


def test_a_relative_xdg_folder_counts_as_unset(tmp_path, monkeypatch):
    """XDG_STATE_HOME=state put the sessions under whatever folder the app was started in, so /load
    listed other ones in each folder; the XDG spec makes a relative value invalid."""
    from internvl_chat.engine.compiled import use_cache_dir
    from internvl_chat.settings import default_config_path
    from internvl_chat.ui.saved_sessions import default_sessions_dir

    for value in ("state", "./state", "", "~/state"):
        env = {"HOME": str(tmp_path), "XDG_STATE_HOME": value, "XDG_CONFIG_HOME": value}
        assert default_sessions_dir(env) == tmp_path / ".local/state/internvl-chat/sessions"
        assert default_config_path(env) == tmp_path / ".config/internvl-chat/config.toml"
    assert default_sessions_dir({"HOME": str(tmp_path), "XDG_STATE_HOME": "/srv/state"}) == Path("/srv/state/internvl-chat/sessions")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # so that the value use_cache_dir sets is undone
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert use_cache_dir() == tmp_path / ".cache/internvl-chat/inductor"


def test_visible_makes_controls_bidi_and_undecodable_bytes_inert():
    assert visible("a\x1b[31mb\x07\u202ec\td\n") == "a\\e[31mb\\x07\\u202ec\\td\\n"
    # line and paragraph separators break a line where a terminal or a log reader honours them;
    # the word joiner and invisible operators hide between letters; the Arabic letter mark is a bidi mark
    assert visible("a\u2028b\u2029c\u2060d\u2064e\u061cf") == "a\\u2028b\\u2029c\\u2060d\\u2064e\\u061cf"
    undecodable = b"caf\xe9.png".decode("utf-8", errors="surrogateescape")  # a non-UTF-8 file name
    assert visible(undecodable) == "caf\\xe9.png"
    visible(undecodable).encode("utf-8")  # printable on any UTF-8 terminal
    assert visible("\ud800") == "\\ud800"  # a JSON escape of a lone surrogate
    assert visible_lines("one\ttwo\nthree\x1b]0;title\x07") == "one\ttwo\nthree\\e]0;title\\x07"


def test_undecodable_byte_finds_the_original_byte():
    assert undecodable_byte("plain 中文") is None
    assert undecodable_byte(b"ab\xff".decode("utf-8", errors="surrogateescape")) == 0xFF
    assert undecodable_byte("x\ud800") == 0xD800


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "a PNG image"),
        (b"\xff\xd8\xff\xe0\0\x10JFIF", "a JPEG image"),
        (b"RIFF\0\0\0\0WEBPVP8 ", "a WebP image"),
        (b"\0\0\0\x18ftypmp42", "a video (MP4/MOV)"),
        (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic", "a HEIC image"),  # an iPhone photo: the same box, a picture's brand
        (b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf", "an AVIF image"),
        (b"\0\0\0\x1cftypavis\0\0\0\0avismsf1miaf", "a video (MP4/MOV)"),  # an animated AVIF: a track video readers play
        (b"hello\0world", "binary data"),
        ("ordinary text, 中文\n".encode(), None),
        (b"caf\xe9 latin-1 text", None),  # not binary: the UTF-8 check reports it
    ],
)
def test_sniff_binary(data, kind):
    assert sniff_binary(data) == kind


def test_without_a_home_folder_the_app_still_runs_and_says_what_to_set(tmp_path, monkeypatch):
    """HOME unset for a uid with no account entry (a container's arbitrary --user): Path.home()
    raised RuntimeError, so every start ended in a traceback while looking for the user config."""
    import pwd

    from internvl_chat.settings import load_settings
    from internvl_chat.ui.saved_sessions import default_sessions_dir
    from internvl_chat.ui.repl import open_history

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    settings = load_settings(env={})  # no home, so no user config file: the defaults
    assert settings.sources["generation.temperature"] == "default"
    with pytest.raises(UsageError, match=r"^~/.local/state is in the home folder, which is unknown .*; set HOME or \$XDG_STATE_HOME$"):
        default_sessions_dir({})
    assert default_sessions_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "internvl-chat" / "sessions"
    with pytest.raises(UsageError, match=r"^~/notes.json is in the home folder, which is unknown"):
        expand_home("~/notes.json")

    class Warnings:
        lines: list[str] = []

        def warn(self, text: str) -> None:
            self.lines.append(text)

    warnings = Warnings()
    open_history(settings, warnings)  # the REPL starts, its history in memory
    assert warnings.lines == ["~/.local/state is in the home folder, which is unknown (HOME is not set and this user "
                              "has no account entry); set HOME or $XDG_STATE_HOME; the history is kept in memory only "
                              "this time"]  # fmt: skip


def test_write_atomic_takes_a_name_as_long_as_the_file_system_allows(tmp_path):
    # the temporary file was named after the target plus 14 characters: a valid 245-character name
    # failed with "File name too long"
    for name in ("n" * 245 + ".json", "\U0001f600" * 60 + ".json"):  # 250 bytes, 245 of them in 4-byte characters
        path = tmp_path / name
        write_atomic(path, "data")
        assert path.read_text() == "data"
        path.unlink()
    assert os.listdir(tmp_path) == []


def test_expand_home_decides_on_the_text_so_dot_slash_tilde_is_a_file_here(tmp_path, monkeypatch):
    # `--image ./~root.png` became Path("~root.png") and then root's home folder
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert expand_home("./~root.png") == tmp_path / "~root.png"
    assert expand_home(expand_home("./~root.png")) == tmp_path / "~root.png"  # anchored: never re-read as ~root
    assert expand_home("~/x.png") == expand_home(Path("~/x.png")) == tmp_path / "home" / "x.png"
    assert expand_home("notes/x.png") == Path("notes/x.png")  # other relative paths stay as given
    with pytest.raises(UsageError, match="there is no user 'no-such-user-internvl-chat'"):
        expand_home("~no-such-user-internvl-chat/x.png")


def test_an_unknown_user_with_hostile_characters_is_named_escaped_once():
    """The user name was escaped, then quoted with repr(), which doubled every backslash: ESC showed as `\\\\e`."""
    with pytest.raises(UsageError) as refused:
        expand_home("~no-such\x1b[31muser\u202e/x.png")
    line = str(refused.value)
    assert "\x1b" not in line and "\u202e" not in line, repr(line)
    assert "there is no user 'no-such\\e[31muser\\u202e' for ~no-such\\e[31muser\\u202e;" in line, line
    assert "\\\\" not in line, line


def test_open_regular_file_refuses_a_fifo_through_its_descriptor_without_blocking(tmp_path):
    from internvl_chat.files import NotRegularFile, open_regular_file

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = []

    def try_open() -> None:
        try:
            open_regular_file(fifo).close()
            outcome.append("opened")
        except NotRegularFile as e:
            outcome.append(e.strerror)

    opener = threading.Thread(target=try_open, daemon=True)  # a regression that blocks fails, never hangs
    opener.start()
    opener.join(timeout=60)
    if opener.is_alive():  # unblock the stuck open before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert outcome == ["not a regular file (a pipe or a device?)"]
    with pytest.raises(IsADirectoryError), open_regular_file(tmp_path):
        pass
    (tmp_path / "a.txt").write_bytes(b"abc")
    with open_regular_file(tmp_path / "a.txt") as f:
        assert f.read() == b"abc"
