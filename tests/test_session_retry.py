"""/retry feeds only the last token of its turn's cached prompt again, and answers exactly as prefilling
the whole prompt again did (the fallback, still taken where the cache cannot be shown to hold it)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from internvl_chat.chat.session import Session
from internvl_chat.chat.template import PromptBuilder
from internvl_chat.engine.loader import load_model
from internvl_chat.errors import Cancelled, ContextOverflowError, GenerationError
from media_helpers import textured_rgb
from session_helpers import final_event
from test_session import _params

TOL = 1e-4  # relative to the largest logit, as tests/test_session.py


@pytest.fixture(scope="module")
def loaded(tiny_original):
    return load_model(tiny_original, device="cpu", dtype="float32", max_context=4096, compile="off")


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media") / "wide.png"
    Image.fromarray(textured_rgb(896, 448, seed=5)).save(path)  # 2 tiles + thumbnail
    return path


def _prefilling(session: Session) -> Session:
    """The session, forced down the old path: every retry prefills its turn's whole prompt again."""
    session._cached_prompt_end = lambda turn: None
    return session


class ForwardSpy:
    """Records (start_pos, tokens, with image features) of every model.forward call."""

    def __init__(self, model, monkeypatch):
        self.calls: list[tuple[int, int, bool]] = []
        real = model.forward

        def spy(ids, start_pos, features=None, *a, **k):
            n = ids.numel() if isinstance(ids, torch.Tensor) else len(ids)
            self.calls.append((start_pos, n, features is not None))
            return real(ids, start_pos, features, *a, **k)

        monkeypatch.setattr(model, "forward", spy)


def _next_logits(session: Session) -> torch.Tensor:
    """The logits the next turn's prefill gives: they equal a fresh prefill's only if the cache holds ids[:start_pos]."""
    follow = session.builder.next_turn("And then?", [])
    return session.model.forward(session.ids[session.start_pos :] + follow, session.start_pos).clone()


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (got - want).abs().max().item() <= TOL * want.abs().max().item()


# ---- each scenario runs on a fresh Session; it returns what its retries answered -------------------
def _image_then_text(s: Session, picture: Path, tmp_path: Path) -> list:
    answers = [final_event(s.ask("Describe it.", [s.describe_image(picture)]))["token_ids"]]
    final_event(s.ask("And the colours?"))
    answers.append(final_event(s.retry())["token_ids"])
    s.undo()
    answers.append(final_event(s.retry())["token_ids"])  # the image turn itself
    answers.append(final_event(s.retry(_params(9)))["token_ids"])
    return answers


def _undo_retry_sequence(s: Session, picture: Path, tmp_path: Path) -> list:
    # answers cut at the length limit: the next prompt begins with the cut answer's uncached token
    final_event(s.ask("First.", (), _params(2)))
    final_event(s.ask("Second.", (), _params(3)))
    final_event(s.ask("Third?"))
    answers = [final_event(s.retry())["token_ids"], final_event(s.retry(_params(4)))["token_ids"]]
    s.undo()
    answers.append(final_event(s.retry())["token_ids"])  # its prompt begins with the pending token
    s.undo()
    answers.append(final_event(s.retry())["token_ids"])  # the first turn, system message and all
    answers.append(final_event(s.ask("Fourth?"))["token_ids"])
    answers.append(final_event(s.retry())["token_ids"])
    return answers


def _failed_and_cancelled_retries(s: Session, picture: Path, tmp_path: Path) -> list:
    final_event(s.ask("Look.", [s.describe_image(picture)]))
    final_event(s.ask("Tell me a long story.", (), _params(8)))
    answers = []
    real, calls = s.model.forward, []

    def failing(*a, **k):  # out of memory in the new answer's third decode step
        calls.append(1)
        if len(calls) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*a, **k)

    s.model.forward = failing
    try:
        with pytest.raises(GenerationError):
            final_event(s.retry())
    finally:
        del s.model.forward
    answers.append(final_event(s.retry())["token_ids"])  # after a failed retry was restored
    events = s.retry()
    next(events)
    events.close()  # abandoned before it was committed: the old answer is restored
    answers.append(final_event(s.retry())["token_ids"])
    cancel = threading.Event()
    for event in s.retry(_params(8), cancel):
        cancel.set()  # the answer is cut and kept
    answers.append((event["finish_reason"], event["token_ids"]))
    answers.append(final_event(s.retry())["token_ids"])  # the retry of a cancelled answer
    return answers


def _after_load(s: Session, picture: Path, tmp_path: Path) -> list:
    final_event(s.ask("Describe it.", [s.describe_image(picture)], _params(3)))
    final_event(s.ask("And more?"))
    path = s.save(tmp_path / f"chat-{id(s)}.json")
    s.clear()
    s.load(path)
    answers = [final_event(s.retry())["token_ids"]]
    s.undo()
    answers.append(final_event(s.retry())["token_ids"])
    return answers


def _after_system_change(s: Session, picture: Path, tmp_path: Path) -> list:
    final_event(s.ask("Describe it.", [s.describe_image(picture)]))
    final_event(s.ask("And more?", (), _params(2)))
    s.set_system("Answer in French.")
    answers = [final_event(s.retry())["token_ids"]]
    s.undo()
    answers.append(final_event(s.retry())["token_ids"])  # its first prompt holds the new system message
    return answers


SCENARIOS = [_image_then_text, _undo_retry_sequence, _failed_and_cancelled_retries, _after_load, _after_system_change]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__.strip("_"))
def test_retry_answers_as_prefilling_the_whole_prompt_again(loaded, picture, tmp_path, scenario):
    results = []
    for session in (Session(loaded, _params()), _prefilling(Session(loaded, _params()))):
        answers = scenario(session, picture, tmp_path)
        turns = [(t.user_text, t.answer_ids, t.finish_reason, t.ids_before, t.pos_before, t.prompt_ids) for t in session.turns]
        results.append((answers, list(session.ids), session.start_pos, turns, _next_logits(session)))
    (answers, ids, start_pos, turns, logits), (want_answers, want_ids, want_start, want_turns, want_logits) = results
    assert answers == want_answers
    assert (ids, start_pos, turns) == (want_ids, want_start, want_turns)
    assert _close(logits, want_logits)


def test_retry_prefills_one_token_and_runs_no_vision(loaded, picture, monkeypatch):
    session = Session(loaded, _params())
    final_event(session.ask("Describe it.", [session.describe_image(picture)]))
    final_event(session.ask("And more?", (), _params(2)))  # cut at the limit: one token left uncached
    final_event(session.ask("Why?"))
    last = session.turns[-1]
    prompt_end = last.ids_before + len(last.prompt_ids)
    spy = ForwardSpy(loaded.model, monkeypatch)
    monkeypatch.setattr(loaded.model, "encode_images", lambda *a, **k: pytest.fail("the vision encoder ran"))
    final = final_event(session.retry())  # its prompt begins with the cut answer's pending token
    session.undo()
    session.undo()
    image_turn = final_event(session.retry())
    assert spy.calls[0] == (prompt_end - 1, 1, False)  # the prompt's last token, at its own position
    assert all(n == 1 for _, n, _ in spy.calls)  # and then one token a step
    assert final["timing"]["prefill_tokens"] == 1 and final["usage"]["prompt_tokens"] == 1
    assert image_turn["timing"]["prefill_tokens"] == 1
    assert session.turns[-1].timing["prefill_tokens"] == 1  # what /stats shows


def test_the_fallback_prefills_the_whole_prompt(loaded, monkeypatch):
    session = _prefilling(Session(loaded, _params()))
    final_event(session.ask("First."))
    final_event(session.ask("Second."))
    last = session.turns[-1]
    spy = ForwardSpy(loaded.model, monkeypatch)
    retried = final_event(session.retry())
    assert retried["timing"]["prefill_tokens"] == len(last.prompt_ids) + last.ids_before - last.pos_before
    assert spy.calls[0] == (last.pos_before, len(last.prompt_ids) + last.ids_before - last.pos_before, False)


def test_a_prompt_the_builder_no_longer_gives_is_prefilled_again(loaded, monkeypatch):
    session = Session(loaded, _params(), system_message="Be brief.")
    final_event(session.ask("Hi."))
    # the system message changed without a replay: the cached first prompt is not the one asked now
    session.builder = PromptBuilder(loaded.tokenizer, "Be long.", loaded.config.tokens_per_tile)
    assert session._cached_prompt_end(session.turns[-1]) is None
    spy = ForwardSpy(loaded.model, monkeypatch)
    final = final_event(session.retry())
    assert spy.calls[0] == (0, len(session.turns[-1].prompt_ids), False)
    assert session.ids[: len(session.turns[-1].prompt_ids)] == session.builder.first_turn("Hi.")
    assert final["timing"]["prefill_tokens"] == len(session.turns[-1].prompt_ids)


def test_a_prompt_past_start_pos_is_not_taken_as_cached(loaded):
    session = Session(loaded, _params())
    final_event(session.ask("First."))
    final_event(session.ask("Second."))
    last = session.turns[-1]
    end = last.ids_before + len(last.prompt_ids)
    assert session._cached_prompt_end(last) == end
    session.start_pos = end - 1
    assert session._cached_prompt_end(last) is None


def test_a_failed_retry_restores_the_old_answer_prefilling_only_past_the_prompt(loaded, picture, monkeypatch):
    session = Session(loaded, _params())
    final_event(session.ask("Describe it.", [session.describe_image(picture)]))
    final_event(session.ask("Go on."))
    last = session.turns[-1]
    before = (list(session.ids), session.start_pos, list(session.turns))
    expected = _next_logits(session)
    cut = last.ids_before + len(last.prompt_ids) - 1
    spy = ForwardSpy(loaded.model, monkeypatch)
    spied, calls = loaded.model.forward, []

    def failing(*a, **k):  # the new answer's first decode step runs out of memory
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError()
        return spied(*a, **k)

    monkeypatch.setattr(loaded.model, "forward", failing)
    with pytest.raises(GenerationError, match="out of memory"):
        final_event(session.retry())
    # the prompt's last token, then the restore: that token and the old answer, no picture
    assert spy.calls == [(cut, 1, False), (cut, before[1] - cut, False)]
    monkeypatch.undo()
    assert (session.ids, session.start_pos, session.turns) == before and session.turns[-1] is last
    assert _close(_next_logits(session), expected)


def test_a_cancel_set_before_the_retry_stops_it_before_its_prefill(loaded):
    session = Session(loaded, _params())
    final_event(session.ask("First."))
    final_event(session.ask("Second."))
    before = (list(session.ids), session.start_pos, list(session.turns))
    expected = _next_logits(session)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        final_event(session.retry(None, cancel))
    assert (session.ids, session.start_pos, session.turns) == before
    assert _close(_next_logits(session), expected)


def test_a_retry_over_the_context_changes_nothing_and_prefills_nothing(loaded, monkeypatch):
    session = Session(loaded, _params())
    final_event(session.ask("First."))
    final_event(session.ask("Second."))
    before = (list(session.ids), session.start_pos, list(session.turns))
    last = session.turns[-1]
    spy = ForwardSpy(loaded.model, monkeypatch)
    too_many = session.max_context - (last.ids_before + len(last.prompt_ids)) + 1
    with pytest.raises(ContextOverflowError, match=f"needs {last.pos_before:,} cached"):
        final_event(session.retry(_params(too_many)))
    assert (session.ids, session.start_pos, session.turns) == before and spy.calls == []


def test_a_system_change_reuses_the_kept_image_features(loaded, picture, tmp_path, monkeypatch):
    """/system prefills the conversation again under the new message, with the image features its
    turns kept (the vision encoder does not run again); it holds what loading it afresh gives."""
    session = Session(loaded, _params())
    final_event(session.ask("Describe it.", [session.describe_image(picture)]))
    final_event(session.ask("And more?"))
    final_event(session.ask("Compare them.", [session.describe_image(picture)]))
    with monkeypatch.context() as patch:
        patch.setattr(loaded.model, "encode_images", lambda *a, **k: pytest.fail("the vision encoder ran"))
        session.set_system("Answer in French.")
    assert session.ids == session.conversation_ids(session.turns)
    assert [t.features.shape[0] if t.features is not None else 0 for t in session.turns] == [3, 0, 3]
    fresh = Session(loaded, _params())
    fresh.load(session.save(tmp_path / "chat.json"))  # a loaded session's turns kept nothing: encoded
    assert fresh.ids == session.ids and fresh.start_pos == session.start_pos
    assert _close(_next_logits(session), _next_logits(fresh))


@pytest.mark.parametrize("prefilling", [False, True], ids=["one-token", "whole-prompt"])
def test_a_retry_over_the_context_names_only_fixes_that_work_for_a_retry(loaded, picture, prefilling):
    """A retry asks the same question with the same attachments: fewer tiles or frames, a shorter
    message or /clear (which removes the turn) cannot make it fit; a smaller answer can, and an
    /undo lets the question be asked again with fewer tiles. A text-only turn's refusal once
    advised "fewer tiles or frames" and "/clear" all the same."""
    session = Session(loaded, _params())
    final_event(session.ask("First."))
    final_event(session.ask("Second."))
    final_event(session.ask("Describe it.", [session.describe_image(picture, max_tiles=1)]))
    for turns in (3, 2):  # the picture's turn, then (after /undo) a text-only one
        if prefilling:
            _prefilling(session)
        last = session.turns[-1]
        too_many = session.max_context - (last.ids_before + len(last.prompt_ids)) + 1
        with pytest.raises(ContextOverflowError) as refused:
            final_event(session.retry(_params(too_many)))
        message = str(refused.value)
        assert "use a smaller max_new_tokens" in message and "/clear" not in message, message
        if turns == 3:
            assert "/undo and ask it with fewer tiles or frames" in message, message
        else:
            assert "tiles or frames" not in message and "shorter" not in message, message
        session.undo()
