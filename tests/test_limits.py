"""Limits, budgets and numerics end to end: a conversation that fills the context, sampling values
at their extremes (flags, settings and the server's request body), and a model's own positions."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from rich.console import Console

from internvl_chat.chat.sampling import SamplingParams
from internvl_chat.chat.sampling import params_from_settings as sampling_params
from internvl_chat.chat.session import Session
from internvl_chat.engine.loader import load_model
from internvl_chat.settings import load_settings
from internvl_chat.ui.app import ERROR, OK, App

CONTEXT = 256


@pytest.fixture(scope="module")
def small(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=CONTEXT)


def make_app(loaded, cwd: Path, **overrides) -> tuple[App, io.StringIO]:
    settings = load_settings(os.devnull, env={}, overrides=overrides)
    session = Session(loaded, params=sampling_params(settings))
    out = io.StringIO()
    return App(session, settings, Console(file=out, width=300, color_system=None), cwd=cwd), out


def output(out: io.StringIO) -> str:
    text = out.getvalue()
    out.truncate(0), out.seek(0)
    return text


def _filling_question(loaded, answer_room: int) -> str:
    """A first question that leaves exactly `answer_room` tokens of the context for its answer."""
    probe = Session(loaded, SamplingParams())
    target = loaded.model.max_seq_len - answer_room
    for n in range(1, target):
        for text in ("x" * n, "x" * n + "."):
            length = len(probe._turn_ids(text, []))
            if length == target:
                return text
            if length > target:
                break
    raise AssertionError(f"no question of {target} tokens")


# ---- a conversation that fills the context -----------------------------------------------------


def test_a_conversation_that_filled_the_context_loads_back_and_undo_and_retry_still_work(small, tmp_path):
    # /load (and /system) demanded room for another answer on top of the conversation, so a
    # conversation the app itself had just filled to the last token could not be loaded back with
    # the very settings it was made with, although /undo, /retry and /export all worked on it.
    room = 4
    app, out = make_app(small, tmp_path, **{"generation.max_new_tokens": room})
    assert app.handle_line(_filling_question(small, room)) == OK
    turn = app.session.turns[-1]
    assert turn.finish_reason == "length" and app.session.context_used == CONTEXT  # precondition: it filled it
    assert "the context is full" in output(out)
    assert app.handle_line(f"/save {tmp_path / 'full.json'}") == OK

    other, out2 = make_app(small, tmp_path, **{"generation.max_new_tokens": room})
    assert other.handle_line(f"/load {tmp_path / 'full.json'}") == OK, output(out2)
    said = output(out2)
    assert f"context {CONTEXT}/{CONTEXT}" in said
    assert "warning: the context has no room for another question and its answer; /undo or /clear make room" in said
    assert other.session.turns[-1].answer_ids == turn.answer_ids
    assert other.handle_line("And then?") == ERROR  # refused with the budget's own message, nothing lost
    assert "over the 256-token context" in output(out2) and len(other.session.turns) == 1
    assert other.handle_line("/retry") == OK  # greedy: the same answer, from the same cache
    assert other.session.turns[-1].answer_ids == turn.answer_ids
    assert other.handle_line("/undo") == OK and other.session.context_used == 0
