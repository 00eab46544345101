"""run_repl's loop without a terminal: the prompt, the terminal and the model stand in (the pty
tests in test_repl_pty.py drive the real thing)."""

from __future__ import annotations

import argparse
import io
import os
import sys
from contextlib import contextmanager

import pytest
from rich.console import Console

from internvl_chat.errors import MediaError
from internvl_chat.settings import load_settings
from internvl_chat.ui import repl
from internvl_chat.ui.commands import block_is_open, unwrap_block
from internvl_chat.ui.typeahead import TypeAhead
from app_helpers import ChunkedAnswers


class _Undecodable(ChunkedAnswers):
    """Fails a message that names "picture" before any answer, as a truncated image does when decoded."""

    def ask(self, text, media=(), params=None, cancel=None):
        if "picture" in text:
            raise MediaError("cannot decode cat.png: the file is truncated or corrupt")
        return super().ask(text, media, params, cancel)


class _TerminalText(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(monkeypatch, lines: list[str], typed_ahead: list[str], first: str | None = None) -> tuple[list[str], str]:
    """The `default=` each prompt got while `lines` were entered (keys `typed_ahead[i]` held while
    line i ran; `first`: the message of `-I -p`), and what was printed."""
    out = io.StringIO()
    defaults: list[str] = []
    entered = iter(lines)
    held = iter(["", *typed_ahead])  # the first hold is the model's loading

    def prompt(self, session, message, default=""):
        defaults.append(default)
        try:
            return next(entered)
        except StopIteration:
            raise EOFError from None

    @contextmanager
    def held_keys():
        keys = TypeAhead()
        yield keys
        keys.text = next(held)

    monkeypatch.setattr(sys, "stdin", type("Tty", (), {"isatty": staticmethod(lambda: True)})())
    monkeypatch.setattr(sys, "stdout", _TerminalText())  # where the prompt is shown
    monkeypatch.setattr(repl.ReplSignals, "install", lambda self: None)
    monkeypatch.setattr(repl.ReplSignals, "prompt", prompt)
    monkeypatch.setattr(repl, "held_keys", held_keys)
    monkeypatch.setattr(repl, "build_prompt_session", lambda app, settings, late=None: None)
    monkeypatch.setattr(repl, "open_conversation", lambda settings, show_progress: _Undecodable(["Fine."]))
    monkeypatch.setattr(repl, "media_from_flags", lambda session, args, settings: [])
    monkeypatch.setattr(repl, "ui_console", lambda file, ui: Console(file=out, width=200, color_system=None))
    monkeypatch.setattr(repl.App, "banner", lambda self: None)
    settings = load_settings(os.devnull, env={}, overrides={"ui.history": False, "ui.stats": False})
    assert repl.run_repl(argparse.Namespace(), settings, first) == 0
    return defaults, out.getvalue()


def test_a_message_that_failed_before_it_was_sent_starts_the_next_prompt(monkeypatch):
    defaults, shown = _run(monkeypatch, ["What is in the picture?", "/drop 9", "Hello."], ["", "", ""])
    assert "error: cannot decode cat.png" in shown
    assert defaults == ["", "What is in the picture?", "", ""]  # a failed command is not put back, a sent message neither
    # said once, after the failed message: text typed at that prompt is added to it
    assert shown.count(repl.FAILED_MESSAGE_KEPT) == 1
    assert shown.index("error: cannot decode cat.png") < shown.index(repl.FAILED_MESSAGE_KEPT)


def test_keys_typed_while_it_failed_follow_it_on_a_line_of_their_own(monkeypatch):
    defaults, _ = _run(monkeypatch, ["Describe the picture"], ["and then"])
    assert defaults == ["", "Describe the picture\nand then"]


def test_keys_typed_while_a_block_failed_go_inside_it(monkeypatch):
    '''A failed `"""` block with keys typed meanwhile came back with them after its closing quotes:
    the block was open again, so Enter added a line, and closing it sent the quotes inside.'''
    block = '"""\nDescribe the picture\nin detail\n"""'
    defaults, _ = _run(monkeypatch, [block], ["and then"])
    assert defaults == ["", '"""\nDescribe the picture\nin detail\nand then\n"""']
    assert not block_is_open(defaults[1]) and unwrap_block(defaults[1]) == "Describe the picture\nin detail\nand then"


def test_keys_typed_while_a_block_failed_keep_its_closing_quotes_as_typed():
    for failed, given_back in [
        ('"""\npicture\n  """  ', '"""\npicture\nmore\n  """  '),  # indented, trailing spaces
        ('"""\npicture"""', '"""\npicture\nmore"""'),  # the quotes end the text's last line
        ('"""picture"""', '"""picture\nmore"""'),
        ('"""\npicture', '"""\npicture\nmore'),  # not a closed block: after it, as for any message
        ('the picture """', 'the picture """\nmore'),
    ]:
        assert repl.next_prompt_text(failed, "more") == given_back, failed
        assert repl.next_prompt_text(failed, "") == failed


def test_the_message_of_dash_I_dash_p_that_failed_starts_the_first_prompt_as_a_typed_one_would(monkeypatch):
    # `-I -p TEXT` whose picture did not decode: the text was not offered back, unlike a typed message
    defaults, shown = _run(monkeypatch, ["Hello."], [""], first="/tmp is in the picture?")
    assert defaults == ["//tmp is in the picture?", ""]  # doubled: typed back, it is still a message, not /tmp
    assert shown.count(repl.FAILED_MESSAGE_KEPT) == 1
    assert shown.index("error: cannot decode cat.png") < shown.index(repl.FAILED_MESSAGE_KEPT)
    defaults, shown = _run(monkeypatch, [], [], first="Hello.")  # sent: nothing comes back
    assert defaults == [""] and repl.FAILED_MESSAGE_KEPT not in shown


# --- stdout piped while stdin is a terminal (`-I | tee log`) --------------------------------------


@contextmanager
def _terminal_file():
    """A file on a real terminal (the follower end of a new pseudo-terminal)."""
    leader, follower = os.openpty()
    try:
        with open(follower, "w", encoding="utf-8", closefd=False) as file:
            yield file
    finally:
        os.close(leader), os.close(follower)


def test_with_stdout_piped_the_prompt_is_drawn_on_the_terminal(monkeypatch):
    # it was drawn into the pipe: the person typing saw no prompt and no echo, and the log got
    # the redraws (carriage returns, blank lines reserved for the completion menu)
    settings = load_settings(os.devnull, env={}, overrides={"ui.history": False})
    read_end, write_end = os.pipe()
    with _terminal_file() as terminal, open(write_end, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        monkeypatch.setattr(sys, "stderr", terminal)
        session = repl.build_prompt_session(argparse.Namespace(cwd=None), settings)
        assert session.output.fileno() == terminal.fileno()
    os.close(read_end)


def test_with_stdout_piped_a_yes_no_question_is_asked_on_the_terminal(monkeypatch):
    piped = io.StringIO()
    with _terminal_file() as terminal:
        written = []
        monkeypatch.setattr(terminal, "write", written.append)
        monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
        monkeypatch.setattr(sys, "stdout", piped)
        monkeypatch.setattr(sys, "stderr", terminal)
        assert repl.ask_yes_no("replace it? [y/N] ") is True
    assert written == ["replace it? [y/N] "] and piped.getvalue() == ""


def test_with_stdout_piped_a_yes_no_question_left_with_ctrl_d_ends_its_line_on_the_terminal(monkeypatch):
    # the newline went into the pipe: the next line was drawn after the question, the log got a blank one
    piped = io.StringIO()
    with _terminal_file() as terminal:
        written = []
        monkeypatch.setattr(terminal, "write", written.append)
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # Ctrl-D: EOF
        monkeypatch.setattr(sys, "stdout", piped)
        monkeypatch.setattr(sys, "stderr", terminal)
        assert repl.ask_yes_no("replace it? [y/N] ") is False
    assert "".join(written) == "replace it? [y/N] \n" and piped.getvalue() == ""


def test_the_repl_is_refused_where_no_terminal_could_show_its_prompt(monkeypatch):
    from internvl_chat.errors import UsageError

    monkeypatch.setattr(sys, "stdin", type("Tty", (), {"isatty": staticmethod(lambda: True)})())
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(repl.ReplSignals, "install", lambda self: pytest.fail("the REPL started"))
    settings = load_settings(os.devnull, env={}, overrides={"ui.history": False})
    with pytest.raises(UsageError, match="needs a terminal on stdout or stderr to show its prompt"):
        repl.run_repl(argparse.Namespace(), settings)


# --- TERM=dumb: prompt_toolkit's plain prompt ------------------------------------------------------


def test_the_plain_prompt_shows_the_text_the_line_starts_with(monkeypatch, tmp_path):
    # a failed message given back (or keys typed ahead) was in the line but never shown: the plain
    # prompt echoes only the keys typed after it, so Enter sent a text the user could not see
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.data_structures import Size
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output.vt100 import Vt100_Output

    from internvl_chat.ui.app import App

    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setattr(repl, "terminal_output", lambda: None)  # the session's own output, below
    shown = io.StringIO()
    output = Vt100_Output(shown, lambda: Size(rows=24, columns=80), term="dumb")
    settings = load_settings(os.devnull, env={}, overrides={"ui.history": False, "ui.stats": False})
    app = App(ChunkedAnswers(["Fine."]), settings, Console(file=io.StringIO(), color_system=None), cwd=tmp_path)
    with create_pipe_input() as keys, create_app_session(input=keys, output=output):
        session = repl.build_prompt_session(app, settings)
        keys.send_text(" again\r")
        line = session.prompt("> ", default="//tmp is in\x1b[2J the picture?\nand")
    assert line == "//tmp is in\x1b[2J the picture?\nand again"
    assert "> //tmp is in\\e[2J the picture?\nand again" in shown.getvalue()  # escapes shown inert


# --- Ctrl-D in a block -----------------------------------------------------------------------------


def _typed(keys_typed: str, tmp_path) -> str:
    """The line the REPL's prompt returns for `keys_typed` (no terminal: a pipe and a dummy screen);
    TimeoutError when the keys leave the prompt waiting for more."""
    import asyncio

    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from internvl_chat.ui.app import App

    settings = load_settings(os.devnull, env={}, overrides={"ui.history": False, "ui.stats": False})
    app = App(ChunkedAnswers(["Fine."]), settings, Console(file=io.StringIO(), color_system=None), cwd=tmp_path)
    with create_pipe_input() as keys, create_app_session(input=keys, output=DummyOutput()):
        session = repl.build_prompt_session(app, settings)
        keys.send_text(keys_typed)
        return asyncio.run(asyncio.wait_for(session.prompt_async("> "), 30))


def test_ctrl_d_on_the_empty_last_line_of_a_block_ends_it_as_its_closing_quotes_do(tmp_path):
    # it did nothing: the line was empty, but only an empty buffer quits
    line = _typed('"""\rline one\r\x04', tmp_path)
    assert line == '"""\nline one\n"""' and unwrap_block(line) == "line one"
    assert _typed('/system """\rBe brief.\r\x04', tmp_path) == '/system """\nBe brief.\n"""'


def test_ctrl_d_elsewhere_in_a_block_is_as_before(tmp_path):
    # on a line with text it deletes the character after the cursor (here none); at an empty
    # prompt it quits, as always
    assert _typed('"""\rline one\x04\r"""\r', tmp_path) == '"""\nline one\n"""'
    assert _typed('"""\rab\x1b[D\x04\r"""\r', tmp_path) == '"""\na\n"""'
    with pytest.raises(EOFError):
        _typed("\x04", tmp_path)


def test_text_typed_under_an_ascii_locale_is_read_as_utf8(monkeypatch):
    # PYTHONIOENCODING=ascii (or LC_ALL=C without UTF-8 mode): prompt_toolkit decodes the typed
    # bytes of "é" as surrogates; they were refused as "the input is not UTF-8 text (byte 0xc3)"
    typed = "Caf\xc3\xa9 ?".encode("latin-1").decode("ascii", "surrogateescape")
    _, shown = _run(monkeypatch, [typed, "bad \udcff byte"], ["", ""])
    assert "not UTF-8 text (byte 0xc3)" not in shown
    assert "Fine." in shown
    assert "the input is not UTF-8 text (byte 0xff)" in shown  # bytes that are not UTF-8 are still refused
