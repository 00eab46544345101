"""Ctrl-X Ctrl-E with text that is not UTF-8 (no terminal needed: a pipe stands for the keys)."""

from __future__ import annotations

import asyncio
import stat
import sys
import tempfile
from pathlib import Path

import pytest
from prompt_toolkit import PromptSession
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from internvl_chat.ui.editor import edit_in_editor
from internvl_chat.ui.repl import key_bindings


def _editor(tmp_path: Path, body: str) -> Path:
    """A fake $EDITOR: a Python script that runs `body` with the file's path in `path`."""
    script = tmp_path / "editor.py"
    script.write_text(f"#!{sys.executable}\nimport sys, os\npath = sys.argv[1]\n{body}\n")
    script.chmod(0o700)
    return script


def _edit(monkeypatch, editor: Path, text: str, keys: str = "\x18\x05") -> str:
    """The line the prompt returns after `keys` (Ctrl-X Ctrl-E), with the REPL's key bindings."""
    monkeypatch.setenv("VISUAL", str(editor))
    monkeypatch.setenv("EDITOR", str(editor))
    with create_pipe_input() as pipe:
        session = PromptSession(input=pipe, output=DummyOutput(), key_bindings=key_bindings(), multiline=True,
                                enable_open_in_editor=True)  # fmt: skip
        pipe.send_text(keys)
        # a generous wait: a prompt left waiting (the editor key failed) must fail the test, not hang it
        return asyncio.run(asyncio.wait_for(session.prompt_async("> ", default=text), 60))


def test_the_editor_gets_and_gives_back_bytes_that_are_not_utf8(tmp_path, monkeypatch, capfd):
    """prompt_toolkit's editor key encoded strict UTF-8: a byte typed in a Latin-1 terminal (a
    surrogate in the buffer) raised UnicodeEncodeError inside its event loop: a traceback and
    "Press ENTER to continue...". The bytes now go to the editor and come back as they were."""
    seen = tmp_path / "seen"
    editor = _editor(tmp_path, f"open({str(seen)!r}, 'wb').write(open(path, 'rb').read())")
    assert _edit(monkeypatch, editor, "caf\udce9 \ud800") == "caf\udce9 \ufffd"  # a lone \\ud800 is no byte
    assert seen.read_bytes() == b"caf\xe9 \xef\xbf\xbd"
    assert "Traceback" not in capfd.readouterr().err


def test_an_editor_that_saves_latin1_gives_text_the_app_then_refuses_with_one_line(tmp_path, monkeypatch, capfd):
    editor = _editor(tmp_path, "open(path, 'wb').write(b'caf\\xe9\\n')")
    assert _edit(monkeypatch, editor, "hello") == "caf\udce9"  # the app says: not UTF-8 (byte 0xe9)
    assert "Unhandled exception" not in capfd.readouterr().err


def test_the_temporary_file_is_private_and_removed(tmp_path, monkeypatch):
    record = tmp_path / "record"
    editor = _editor(tmp_path, f"open({str(record)!r}, 'w').write(path + ' ' + oct(os.stat(path).st_mode))\n"
                               "open(path, 'w').write('edited\\n')")  # fmt: skip
    assert _edit(monkeypatch, editor, "secret") == "edited"
    path, mode = record.read_text().split()
    assert stat.S_IMODE(int(mode, 8)) == 0o600
    assert not Path(path).exists()


def test_a_failing_editor_leaves_the_text_as_it_was(tmp_path, monkeypatch):
    editor = _editor(tmp_path, "open(path, 'w').write('lost'); sys.exit(1)")
    assert _edit(monkeypatch, editor, "kept", keys="\x18\x05\r") == "kept"


def _edit_buffer(monkeypatch, editor: Path, text: str) -> str:
    """The buffer's text after the editor key's work, awaited (no prompt: nothing races it)."""
    monkeypatch.setenv("VISUAL", str(editor))
    monkeypatch.setenv("EDITOR", str(editor))
    buffer = Buffer(document=Document(text))
    asyncio.run(asyncio.wait_for(edit_in_editor(buffer, accept=False), 60))
    return buffer.text


def test_a_failing_editor_is_said_in_one_line(tmp_path, monkeypatch, capfd):
    # the line stayed as it was without a word: the user could not tell that the editor had failed
    editor = _editor(tmp_path, "open(path, 'w').write('lost'); sys.exit(1)")
    assert _edit_buffer(monkeypatch, editor, "kept") == "kept"
    assert capfd.readouterr().err == f"the editor ({editor}) ended with status 1; the line is as it was\n"


def test_no_editor_that_runs_is_said_in_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PATH", str(tmp_path))  # no editor, nano or vi to fall back on
    assert _edit_buffer(monkeypatch, tmp_path / "no-such-editor", "kept") == "kept"
    assert capfd.readouterr().err == (f"the editor ({tmp_path / 'no-such-editor'}, from $VISUAL) could not be run "
                                      "(not found); set $VISUAL to an installed editor; the line is as it was\n")  # fmt: skip
    monkeypatch.delenv("VISUAL")
    monkeypatch.delenv("EDITOR")
    buffer = Buffer(document=Document("kept"))
    asyncio.run(asyncio.wait_for(edit_in_editor(buffer, accept=False), 60))
    assert buffer.text == "kept"
    assert capfd.readouterr().err == "no editor could be run (set $VISUAL or $EDITOR); the line is as it was\n"


@pytest.mark.parametrize("chosen", ["no-such-editor", "'unclosed"])
def test_an_editor_chosen_that_cannot_run_is_said_not_replaced_by_vi(chosen, tmp_path, monkeypatch, capfd):
    # a mistyped $EDITOR opened vi (or nano), which the user had not chosen and might not know how to leave
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for fallback in ("editor", "nano", "vi"):
        _editor(bin_dir, "open(path, 'w').write('from a fallback')").rename(bin_dir / fallback)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", chosen)
    buffer = Buffer(document=Document("kept"))
    asyncio.run(asyncio.wait_for(edit_in_editor(buffer, accept=False), 60))
    assert buffer.text == "kept"
    why = "not found" if chosen == "no-such-editor" else "an unclosed quote"
    assert capfd.readouterr().err == (f"the editor ({chosen}, from $EDITOR) could not be run ({why}); "
                                      "set $EDITOR to an installed editor; the line is as it was\n")  # fmt: skip


def test_an_editor_that_removes_the_file_leaves_the_text_as_it_was(tmp_path, monkeypatch, capfd):
    # reading it back raised FileNotFoundError inside prompt_toolkit's event loop: a traceback
    editor = _editor(tmp_path, "os.remove(path)")
    assert _edit_buffer(monkeypatch, editor, "kept") == "kept"
    err = capfd.readouterr().err
    assert err.startswith("the edited text ") and err.endswith(" does not exist; check the path; the line is as it was\n")


def test_no_writable_temporary_folder_is_said_in_one_line(tmp_path, monkeypatch, capfd):
    # $TMPDIR gone and /tmp read-only: mkstemp raised inside prompt_toolkit's event loop ("Unhandled
    # exception in event loop", a traceback, "Press ENTER to continue...")
    editor = _editor(tmp_path, "open(path, 'w').write('lost')")
    with monkeypatch.context() as patched:  # put back before pytest's own temporary folders are cleaned up
        patched.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
        assert _edit_buffer(monkeypatch, editor, "kept") == "kept"
    err = capfd.readouterr().err
    assert err.startswith("the editor needs a temporary file, which could not be made (No such file or directory); "
                          "set TMPDIR to a folder you can write; the line is as it was\n")  # fmt: skip
    assert err.count("\n") == 1

