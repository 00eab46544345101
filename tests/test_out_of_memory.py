"""Running out of memory (or a Ctrl-C) anywhere in a turn, not only in the model's forward or vision encoder
(tests/test_session.py and the session fuzz cover those): the user gets one line, the conversation
is as before, and the next turn answers exactly as a fresh session with the same history does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import internvl_chat.chat.session as session_module
import internvl_chat.ui.app as app_module
from internvl_chat.chat.detokenize import IncrementalDetokenizer
from internvl_chat.chat.generate import is_out_of_memory
from internvl_chat.chat.sampling import Sampler
from internvl_chat.chat.session import Session
from internvl_chat.engine.loader import load_model
from internvl_chat.errors import GenerationError
from app_helpers import make_app, output
from fault_helpers import fail_once
from media_helpers import textured_rgb
from session_helpers import final_event
from test_session import _params
from test_session_retry import _close, _next_logits

CPU_OOM = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"
# what torch raises when a CUDA allocation outside its caching allocator fails (a cuBLAS workspace, a
# graph): a torch.AcceleratorError since torch 2.8, a plain RuntimeError before
CUDA_ERROR = "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call"


def _cuda_error() -> RuntimeError:
    return getattr(torch, "AcceleratorError", RuntimeError)(CUDA_ERROR)


@pytest.fixture(scope="module")
def loaded(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=2048, compile="off")


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media") / "square.png"
    Image.fromarray(textured_rgb(448, 448, seed=5)).save(path)
    return path


def test_cuda_errors_that_say_out_of_memory_are_out_of_memory():
    assert is_out_of_memory(_cuda_error()) and is_out_of_memory(RuntimeError(CUDA_ERROR))
    assert is_out_of_memory(RuntimeError(CPU_OOM)) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("index 7 is out of bounds for dimension 0"))
    assert not is_out_of_memory(ValueError("out of memory"))


def _state(s: Session):
    turns = [(t.user_text, t.answer_ids, t.finish_reason, t.ids_before, t.pos_before, t.prompt_ids) for t in s.turns]
    return list(s.ids), s.start_pos, turns


# where it fails: (owner, attribute, error, which call, what the line says); owners are looked up late
# (the model's forward is a bound method of the loaded model)
POINTS = {
    "forward, a decode step (CUDA error)": (lambda m: m, "forward", _cuda_error, 3, "out of memory during generation"),
    "the detokenizer's flush": (lambda m: IncrementalDetokenizer, "flush", MemoryError, 1, "out of memory during generation"),
    "the detokenizer's push": (lambda m: IncrementalDetokenizer, "push", MemoryError, 2, "out of memory during generation"),
    "the sampler's history": (lambda m: Sampler, "observe", MemoryError, 1, "out of memory during generation"),
    "the sampler": (lambda m: Sampler, "next_token", lambda: RuntimeError(CPU_OOM), 2, "out of memory during generation"),
    "the image's tiles": (lambda m: session_module, "load_image", lambda: RuntimeError(CPU_OOM), 1,
                          "out of memory reading the attachments"),
}


@pytest.mark.parametrize("point", POINTS)
def test_out_of_memory_in_an_ask_is_one_error_and_the_next_turn_is_a_fresh_sessions(loaded, picture, monkeypatch, point):
    owner, name, error, at_call, said = POINTS[point]
    session = Session(loaded, _params(4))
    final_event(session.ask("First."))
    before = _state(session)
    fail_once(monkeypatch, owner(loaded.model), name, error, at_call)
    with pytest.raises(GenerationError, match=f"^{said}; "):
        final_event(session.ask("What is this?", [session.describe_image(picture)]))
    monkeypatch.undo()
    assert _state(session) == before
    fresh = Session(loaded, _params(4))
    final_event(fresh.ask("First."))
    assert _close(_next_logits(session), _next_logits(fresh))
    want = final_event(fresh.ask("What is this?", [fresh.describe_image(picture)]))["token_ids"]
    assert final_event(session.ask("What is this?", [session.describe_image(picture)]))["token_ids"] == want
    assert _state(session) == _state(fresh)


@pytest.mark.parametrize("point", [p for p in POINTS if p != "the image's tiles"])
def test_out_of_memory_in_a_retry_keeps_the_old_answer(loaded, picture, monkeypatch, point):
    owner, name, error, at_call, said = POINTS[point]
    session = Session(loaded, _params(4))
    final_event(session.ask("Look.", [session.describe_image(picture)]))
    final_event(session.ask("Tell me more."))
    before = _state(session)
    fail_once(monkeypatch, owner(loaded.model), name, error, at_call)
    with pytest.raises(GenerationError, match=f"^{said}; "):
        final_event(session.retry())
    monkeypatch.undo()
    assert _state(session) == before
    want = final_event(session.retry())["token_ids"]
    assert want == before[2][-1][1]  # greedy: the same answer again
    session.undo()
    fresh = Session(loaded, _params(4))
    final_event(fresh.ask("Look.", [fresh.describe_image(picture)]))
    assert _close(_next_logits(session), _next_logits(fresh))


@pytest.mark.parametrize("point", POINTS)
def test_the_app_shows_out_of_memory_as_one_line_and_goes_on(loaded, picture, tmp_path, monkeypatch, point):
    # an error the app does not know escapes its guard: the REPL ends with a traceback, the conversation lost
    owner, name, error, at_call, said = POINTS[point]
    app, out = make_app(loaded, tmp_path, max_new_tokens=4)
    app.handle_line("First.")
    before = _state(app.session)
    output(out)
    fail_once(monkeypatch, owner(loaded.model), name, error, at_call)
    assert app.handle_line(f"What is this? {picture}") == app_module.ERROR
    monkeypatch.undo()
    lines = [line for line in output(out).splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {said}; ") and "Traceback" not in "".join(lines)
    assert _state(app.session) == before
    assert app.handle_line(f"What is this? {picture}") == app_module.OK  # the typed path attaches it again
    assert len(app.session.turns) == 2


class _InterruptedStream:
    """choose_stream whose stream raises KeyboardInterrupt as it prints its `at`-th event (a second
    Ctrl-C that lands in the app, between two events, rather than in the model)."""

    def __init__(self, at: int):
        self.at, self.fed = at, 0
        self.real = app_module.choose_stream

    def __call__(self, *a, **k):
        stream = self.real(*a, **k)
        feed = stream.feed

        def interrupted(text):
            self.fed += 1
            if self.fed == self.at:
                raise KeyboardInterrupt
            return feed(text)

        stream.feed = interrupted
        return stream


def test_a_retry_interrupted_between_events_says_the_old_answer_stayed(loaded, tmp_path, monkeypatch):
    app, out = make_app(loaded, tmp_path, max_new_tokens=6, interactive=True)
    app.handle_line("Hello there.")
    before = _state(app.session)
    output(out)
    monkeypatch.setattr(app_module, "choose_stream", _InterruptedStream(2))
    app.handle_line("/retry")
    assert _state(app.session) == before  # put back as the retry's events closed
    assert output(out).strip().splitlines()[-1] == "[interrupted: this answer was discarded; the conversation is unchanged]"


def test_an_answer_interrupted_while_its_last_text_is_printed_is_said_to_be_kept(loaded, tmp_path, monkeypatch):
    fresh = Session(loaded, _params(6))
    final_event(fresh.ask("Hello there."))
    events = list(fresh.ask("Next?"))
    app, out = make_app(loaded, tmp_path, max_new_tokens=6, interactive=True)
    app.handle_line("Hello there.")
    output(out)
    monkeypatch.setattr(app_module, "choose_stream", _InterruptedStream(len(events)))  # the final event
    app.handle_line("Next?")
    assert _state(app.session) == _state(fresh)  # committed before the final event reached the app
    assert "kept" in output(out).strip().splitlines()[-1]


@pytest.mark.parametrize("error", [MemoryError, _cuda_error, KeyboardInterrupt])
def test_a_failure_in_the_third_prefill_chunk_after_an_undo_leaves_the_undone_conversation(loaded, picture, monkeypatch,
                                                                                          error):  # fmt: skip
    monkeypatch.setattr(loaded.model, "prefill_chunk", 64)  # the image turn's ~280 tokens in 5 chunks
    session = Session(loaded, _params(4))
    final_event(session.ask("First."))
    final_event(session.ask("Second."))
    session.undo()
    before = _state(session)
    fail_once(monkeypatch, loaded.model.language_model, "forward_embeds", error, 3)
    with pytest.raises(GenerationError if error is not KeyboardInterrupt else KeyboardInterrupt):
        final_event(session.ask("What is this?", [session.describe_image(picture)]))
    assert _state(session) == before
    monkeypatch.undo()
    fresh = Session(loaded, _params(4))
    final_event(fresh.ask("First."))
    assert _close(_next_logits(session), _next_logits(fresh))
    want = final_event(fresh.ask("What is this?", [fresh.describe_image(picture)]))["token_ids"]
    assert final_event(session.ask("What is this?", [session.describe_image(picture)]))["token_ids"] == want


class _InterruptedAppend(list):
    """A turns list that takes the turn, then gets a Ctrl-C (between the commit and its event)."""

    def append(self, item):
        super().append(item)
        raise KeyboardInterrupt


def test_a_ctrl_c_as_the_answer_is_committed_leaves_the_conversation_as_before(loaded):
    session = Session(loaded, _params(4))
    final_event(session.ask("First."))
    before = _state(session)
    session.turns = _InterruptedAppend(session.turns)
    with pytest.raises(KeyboardInterrupt):
        final_event(session.ask("Second."))
    session.turns = list(session.turns)
    assert _state(session) == before  # not a turn whose ids were rewound
    fresh = Session(loaded, _params(4))
    final_event(fresh.ask("First."))
    assert final_event(session.ask("Second."))["token_ids"] == final_event(fresh.ask("Second."))["token_ids"]
    assert _state(session) == _state(fresh)


def test_a_cuda_error_out_of_memory_while_loading_is_the_one_line_error(tiny_original, monkeypatch):
    from internvl_chat.engine.model import InternVLModel
    from internvl_chat.errors import CheckpointError

    def out_of_memory(self, tensors):
        raise _cuda_error()

    monkeypatch.setattr(InternVLModel, "load_weights", out_of_memory)
    with pytest.raises(CheckpointError, match="^out of memory loading "):
        load_model(tiny_original, device="cpu", dtype="float32", max_context=256, compile="off")


def test_out_of_memory_in_the_compiled_step_runs_that_token_eager_and_keeps_the_step(loaded, capsys):
    # it was taken for the step's own failure: a note, and the eager step for the rest of the run
    from internvl_chat.engine.compiled import CompiledStep

    step = CompiledStep(loaded.model.language_model, loaded.model.device, for_graphs=False)
    errors = [MemoryError(), RuntimeError(CPU_OOM), _cuda_error(), ValueError("a guard failed")]

    def failing(token, pos):
        raise errors.pop(0)

    step.native, step.active = failing, True
    for _ in range(3):
        assert step.exact(torch.tensor([5]), 7) is None
        assert step.active and step.native is failing
    assert "using the eager step" not in capsys.readouterr().err
    assert step.exact(torch.tensor([5]), 7) is None  # any other error: eager from now on, with its note
    assert not step.active and "using the eager step" in capsys.readouterr().err


@pytest.mark.parametrize("prefilling", [False, True], ids=["one cached token", "whole prompt"])
@pytest.mark.parametrize("at", ["Turn", "_check_retry_budget"])
def test_a_ctrl_c_as_a_retry_removes_the_old_answer_puts_it_back(loaded, monkeypatch, prefilling, at):
    # between the retry's removing the old answer and its guard, a Ctrl-C lost the turn and left
    # ids cut inside its prompt
    session = Session(loaded, _params(4))
    final_event(session.ask("First."))
    final_event(session.ask("Second."))
    if prefilling:
        session._cached_prompt_end = lambda turn: None
    before = _state(session)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    if at == "Turn":
        monkeypatch.setattr(session_module, "Turn", interrupted)
    else:
        monkeypatch.setattr(session, "_check_retry_budget", interrupted)
    with pytest.raises(KeyboardInterrupt):
        final_event(session.retry())
    monkeypatch.undo()
    assert _state(session) == before
    assert final_event(session.retry())["token_ids"] == before[2][-1][1]
    assert _state(session) == before
