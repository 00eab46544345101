"""run_repl's loop without a terminal: the prompt, the terminal and the model stand in (the pty
tests in test_repl_pty.py drive the real thing)."""

from __future__ import annotations

import argparse
import io
import os
import sys
from contextlib import contextmanager

from rich.console import Console

from internvl_chat.errors import MediaError
from internvl_chat.settings import load_settings
from internvl_chat.ui import repl
from internvl_chat.ui.typeahead import TypeAhead
from app_helpers import ChunkedAnswers


class _Undecodable(ChunkedAnswers):
    """Fails a message that names "picture" before any answer, as a truncated image does when decoded."""

    def ask(self, text, media=(), params=None, cancel=None):
        if "picture" in text:
            raise MediaError("cannot decode cat.png: the file is truncated or corrupt")
        return super().ask(text, media, params, cancel)


def _run(monkeypatch, lines: list[str], typed_ahead: list[str]) -> tuple[list[str], str]:
    """The `default=` each prompt got while `lines` were entered (keys `typed_ahead[i]` held while
    line i ran), and what was printed."""
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
    monkeypatch.setattr(repl.ReplSignals, "install", lambda self: None)
    monkeypatch.setattr(repl.ReplSignals, "prompt", prompt)
    monkeypatch.setattr(repl, "held_keys", held_keys)
    monkeypatch.setattr(repl, "build_prompt_session", lambda app, settings, late=None: None)
    monkeypatch.setattr(repl, "open_conversation", lambda settings, show_progress: _Undecodable(["Fine."]))
    monkeypatch.setattr(repl, "media_from_flags", lambda session, args, settings: [])
    monkeypatch.setattr(repl, "ui_console", lambda file, ui: Console(file=out, width=200, color_system=None))
    monkeypatch.setattr(repl.App, "banner", lambda self: None)
    settings = load_settings(os.devnull, env={}, overrides={"ui.history": False, "ui.stats": False})
    assert repl.run_repl(argparse.Namespace(), settings) == 0
    return defaults, out.getvalue()


def test_a_message_that_failed_before_it_was_sent_starts_the_next_prompt(monkeypatch):
    defaults, shown = _run(monkeypatch, ["What is in the picture?", "/drop 9", "Hello."], ["", "", ""])
    assert "error: cannot decode cat.png" in shown
    assert defaults == ["", "What is in the picture?", "", ""]  # a failed command is not put back, a sent message neither


def test_keys_typed_while_it_failed_follow_it_on_a_line_of_their_own(monkeypatch):
    defaults, _ = _run(monkeypatch, ["Describe the picture"], ["and then"])
    assert defaults == ["", "Describe the picture\nand then"]
